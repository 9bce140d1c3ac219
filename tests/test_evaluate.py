"""tsdsae.evaluate: which split is scored, val beside it, a missing split in one line."""
import json

import pytest
import torch

from tsdsae.config import EvalConfig, apply_overrides, debug
from tsdsae.data import MissingSplitError, load_dataset
from tsdsae.evaluate import check_eval_split, evaluate, evaluate_run, main
from tsdsae.model.dsae import DSAE
from tsdsae.toy import make_toy_dataset
from test_data_reader import without_test_split


@pytest.fixture(scope="module")
def toy():
    return make_toy_dataset(n_clips=36, seconds=1.0, seed=2)


def test_evaluate_run_scores_test_and_puts_val_beside_it(toy):
    torch.manual_seed(0)
    model = DSAE(debug().model)
    scores = evaluate_run(model, toy, EvalConfig(pitch=False))
    assert scores["split"] == "test" and scores["n_eval"] == len(toy["test"])
    assert {k: scores[k] for k in ("pre_swap", "gswap", "lswap")} == {
        k: v for k, v in evaluate(model, toy, "test").items() if k in ("pre_swap", "gswap", "lswap")}
    val = evaluate(model, toy, "val")
    assert {k: scores[f"val_{k}"] for k in ("pre_swap", "gswap", "lswap")} == {
        k: val[k] for k in ("pre_swap", "gswap", "lswap")}
    on_val = evaluate_run(model, toy, EvalConfig(split="val", pitch=False))
    assert on_val["split"] == "val" and not any(k.startswith("val_") for k in on_val)


def test_a_missing_evaluation_split_is_one_line_saying_what_to_do(small_dmelodies, tmp_path,
                                                                  capsys):
    two_splits = without_test_split(small_dmelodies, tmp_path / "two")
    data = load_dataset(two_splits)                      # train and val only
    model = DSAE(debug().model)
    with pytest.raises(MissingSplitError) as err:
        evaluate(model, data, "test")
    message = str(err.value)
    assert "\n" not in message and "no 'test' split" in message and "eval.split=val" in message
    cfg = apply_overrides(debug(), [f"data.uri={two_splits}"])
    with pytest.raises(MissingSplitError, match="eval.split=val"):
        check_eval_split(cfg)
    check_eval_split(apply_overrides(cfg, ["eval.split=val"]))      # present: no error
    check_eval_split(apply_overrides(cfg, [f"data.uri={small_dmelodies}"]))   # has a test split
    check_eval_split(debug())                                        # toy: train/val/test

    # The training CLI stops before training, exit 2, one line, nothing written.
    from tsdsae.train import main as train_main
    root = tmp_path / "runs"
    code = train_main(["--preset", "debug", "--data", str(two_splits), "--name", "nt",
                       "--quiet", f"checkpoint.root={root}"])
    err_text = capsys.readouterr().err.strip()
    assert code == 2 and len(err_text.splitlines()) == 1
    assert "no 'test' split" in err_text and "eval.split=val" in err_text
    assert not root.exists()


def test_the_cli_says_which_split_it_scores(checkpoint_path, capsys):
    main([str(checkpoint_path), "--device", "cpu"])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["split"] == "test" and "scoring the test split" in captured.err
    assert f"({result['n_eval']} clips" in captured.err
    main([str(checkpoint_path), "--device", "cpu", "--split", "val"])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["split"] == "val" and "scoring the val split" in captured.err
    assert f"({result['n_eval']} clips" in captured.err


def test_evaluation_words_name_chance_for_k_and_a_v_that_carries_nothing():
    from tsdsae.evaluate import evaluation_words

    ok = evaluation_words({"split": "test", "pre_swap": 1.0, "gswap": 0.97, "lswap": 0.96,
                           "gswap_confusion": [[30, 1, 0, 0], [0, 29, 0, 0], [0, 0, 31, 2],
                                               [0, 0, 0, 30]]}, 4)
    assert "chance 0.25 for 4 instruments" in ok and "v carries the instrument" in ok
    # One column: the LDA hears one instrument in every swap, whatever the F1 says.
    one = evaluation_words({"pre_swap": 0.33, "gswap": 0.33, "lswap": 0.33,
                            "gswap_confusion": [[0, 19], [0, 19]]}, 2)
    assert "v carries nothing" in one and "chance 0.50 for 2 instruments" in one
    collapsed = evaluation_words({"pre_swap": 0.8, "gswap": 0.05, "lswap": 0.07,
                                  "gswap_confusion": [[1, 21], [20, 2]]}, 2)
    assert "the global latent collapsed" in collapsed

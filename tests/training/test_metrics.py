"""Caption metrics (`captioner.training.metrics`)."""


def test_metrics_reward_correct_captions():
    from captioner.training.metrics import caption_metrics

    refs = {"a": ["a red circle on the left", "a small red circle on the left side"],
            "b": ["a blue square at the top", "a big blue square near the top"]}
    good = caption_metrics(refs, {"a": "a red circle on the left", "b": "a blue square at the top"}, meteor=False)
    bad = caption_metrics(refs, {"a": "a blue square at the top", "b": "a red circle on the left"}, meteor=False)
    assert good["CIDEr"] > bad["CIDEr"] + 1 and good["BLEU-4"] > 0.5 > bad["BLEU-4"]

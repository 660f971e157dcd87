"""Expert map: the shared / switching statistic, the training log's numbers, the labelled figures."""
import json

import numpy as np
import pytest
import torch

from switch_dit.models import create_model, expert_sharing
from switch_dit.plots import plot_expert_map, save_grid


def _table(selection, steps_per_phase=5):
    """Gate probabilities [T, depth, E] whose top-k follows `selection`: per block, a list of phases,
    each the set of selected experts (probability 0.4 each, rest shared by the others)."""
    depth, e = len(selection), 1 + max(j for block in selection for ph in block for j in ph)
    phases = len(selection[0])
    probs = torch.zeros(phases * steps_per_phase, depth, e)
    for b, block in enumerate(selection):
        for p, chosen in enumerate(block):
            row = torch.full((e,), 0.2 / max(1, e - len(chosen)))
            row[list(chosen)] = 0.8 / len(chosen)
            probs[p * steps_per_phase:(p + 1) * steps_per_phase, b] = row
    return probs


def test_expert_sharing_shared_switching_unused():
    # block 0: expert 0 always, 1 then 2 (one switch); block 1: 3 and 1 always, 0 and 2 never
    probs = _table([[{0, 1}, {0, 2}], [{1, 3}, {1, 3}]])
    s = expert_sharing(probs, k=2)
    assert s["shared"] == [[0], [1, 3]]
    assert s["switching"] == [[1, 2], []]
    assert s["unused"] == [[3], [0, 2]]
    assert s["switches"] == [1, 0]
    assert s["fraction"][0] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert s["shared_mean"] == pytest.approx(1.5) and s["switching_mean"] == pytest.approx(1.0)


def test_expert_sharing_k_equals_e_and_k1():
    probs = torch.softmax(torch.randn(7, 3, 3), -1)
    s = expert_sharing(probs, k=3)
    assert s["shared"] == [[0, 1, 2]] * 3 and s["switches"] == [0, 0, 0]
    s1 = expert_sharing(probs, k=1)
    argmax = probs.argmax(-1)                                  # [T, depth]
    for b in range(3):
        used = sorted(set(argmax[:, b].tolist()))
        assert sorted(s1["shared"][b] + s1["switching"][b]) == used
    with pytest.raises(ValueError, match="k must be"):
        expert_sharing(probs, k=4)
    with pytest.raises(ValueError, match="probs must be"):
        expert_sharing(probs[0], k=1)


def test_model_expert_sharing_matches_its_table():
    torch.manual_seed(0)
    model = create_model("SwitchDiT-S/2", input_size=8, in_channels=1, num_classes=3, depth=2,
                         hidden_size=32, num_heads=4, num_timesteps=30, backend="torch",
                         num_experts=5, k=2)
    with torch.no_grad():
        for blk in model.blocks:
            blk.moe.gate[-1].weight.normal_(0, 3.0)
    s = model.expert_sharing()
    ids = torch.topk(model.expert_routing_table(), 2, dim=-1).indices
    for b in range(2):
        counts = torch.bincount(ids[:, b].reshape(-1), minlength=5)
        assert s["shared"][b] == [j for j in range(5) if counts[j] == 30]
        assert s["unused"][b] == [j for j in range(5) if counts[j] == 0]


def test_training_log_has_expert_statistic(tmp_path):
    from switch_dit.config import get_preset
    from switch_dit.train import train

    cfg = get_preset("digits")
    cfg.max_steps, cfg.log_every, cfg.ckpt_every = 2, 1, 2
    cfg.depth, cfg.hidden_size, cfg.image_size, cfg.global_batch_size = 2, 32, 8, 8
    cfg.results_dir = str(tmp_path / "run")
    out = train(cfg, progress=False)
    with open(tmp_path / "run" / "log.jsonl") as f:
        rows = [json.loads(line) for line in f]
    expected = out["trainer"].model.expert_sharing()
    assert rows[-1]["experts_shared"] == expected["shared_mean"]
    assert rows[-1]["experts_switching"] == expected["switching_mean"]
    assert 0 <= rows[-1]["experts_shared"] + rows[-1]["experts_switching"] <= 3


def test_expert_map_figure_and_labelled_grid(tmp_path):
    from PIL import Image

    probs = _table([[{0, 1}, {0, 2}], [{1, 2}, {1, 2}]])
    path = plot_expert_map(probs, str(tmp_path / "map.png"), k=2)
    assert Image.open(path).size[0] > 100
    plot_expert_map(probs, str(tmp_path / "map_plain.png"))            # without k: no outlines
    plot_expert_map(probs, str(tmp_path / "map_kE.png"), k=3)          # k = E: nothing to outline
    with pytest.raises(ValueError, match="block_labels"):
        plot_expert_map(probs, str(tmp_path / "x.png"), block_labels=["a"])

    images = torch.rand(6, 1, 8, 8) * 2 - 1
    plain = np.asarray(Image.open(save_grid(images, str(tmp_path / "g.png"), nrow=3, scale=2)))
    labelled = np.asarray(Image.open(save_grid(images, str(tmp_path / "gl.png"), nrow=3, scale=2,
                                               row_labels=["7", "9"])))
    margin = labelled.shape[1] - plain.shape[1]
    assert margin > 0 and labelled.shape[0] == plain.shape[0]
    assert np.array_equal(labelled[:, margin:], plain)            # the images are untouched
    assert (labelled[:, :margin] < 128).any()                     # text was drawn in the margin
    with pytest.raises(ValueError, match="row_labels"):
        save_grid(images, str(tmp_path / "bad.png"), nrow=3, row_labels=["1"])

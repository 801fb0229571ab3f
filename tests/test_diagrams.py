"""The two teaching diagrams draw, save, and show what they claim to show."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from tinylm import diagrams  # noqa: E402


def _texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_gpt_block_names_every_parameter_and_both_passes():
    fig = diagrams.gpt_block_figure()
    text = _texts(fig)
    for piece in ("LN$_1$", "c_attn", "causal attention", "c_proj", "LN$_2$", "c_fc", "GELU"):
        assert piece in text, piece
    assert "around the branch" in text and "through it" in text  # the residual's two paths
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("forward" in s for s in labels) and any("backward" in s for s in labels)
    plt.close(fig)


def test_layernorm_graph_shows_the_two_fan_outs():
    fig = diagrams.layernorm_figure()
    text = _texts(fig)
    assert text.count("they add") + text.count("gradients add") == 2  # at x and at x_c
    assert "layernorm_backward" in text
    plt.close(fig)


def test_save_all_writes_two_pngs(tmp_path):
    paths = diagrams.save_all(tmp_path / "images")
    assert [p.name for p in paths] == ["gpt_block.png", "layernorm_graph.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 20_000  # a drawing, not an empty canvas

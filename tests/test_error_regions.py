"""scripts/error_regions.py: the regions of a generated test frame, the ceilings, the split."""
import json
import shutil

import numpy as np
from PIL import Image

from modules import VAE_Model
from modules.checkpoint import save_checkpoint
from scripts import error_regions as er


def test_fill_rows_interpolates_between_the_visible_pixels():
    img = np.zeros((2, 6, 3), np.float32)
    img[0, 0], img[0, 5] = 0.1, 0.6
    img[1] = 0.3
    hole = np.zeros((2, 6), bool)
    hole[0, 1:5] = True
    out = er.fill_rows(img, hole)
    np.testing.assert_allclose(out[0, :, 0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], atol=1e-6)
    np.testing.assert_array_equal(out[1], img[1])  # rows without a hole are left alone


def test_ceilings_and_the_untrained_model_on_generated_data(tiny_dance, tmp_path, capsys):
    """The regions split every frame's pixels; the ghost ceiling is exact but for the revealed
    wall, so it is never below copy-first; an untrained residual first-frame model copies the
    first frame, so it scores copy-first, and nearly all its error is where the dancer is or was
    (the rest is the shadow on the floor, which moves with the dancer)."""
    model = VAE_Model(16, 8, 4, 16, residual=True, condition="first")
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "args": dict(residual=True, condition="first")})
    res = er.analyse(str(tiny_dance), str(ckpt), device="cpu")
    assert [r["name"] for r in res["sequences"]] == ["0", "1"] and res["test_len"] == 20
    for r in res["sequences"]:
        assert abs(sum(r["fraction"].values()) - 1) < 1e-6
        assert r["fraction"]["dancer"] > 0.02 and r["fraction"]["revealed"] > 0
        assert r["ghost"] >= r["copy_first"]
        assert abs(r["model"] - r["copy_first"]) < 1e-4
        assert abs(sum(r["share"].values()) - 1) < 1e-6 and r["share"]["rest"] < 0.01
    assert res["drift_frames"] == 9  # the Tester's: min(100, (L - 1) // 2)
    for end in ("first", "last"):
        assert abs(res["drift"]["model"][end] - res["drift"]["copy_first"][end]) < 1e-4
    assert er.main(["--DR", str(tiny_dance), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean"]["ghost"] == res["mean"]["ghost"] and "model" not in out["mean"]


def test_refuses_data_it_cannot_render(tiny_dance, tmp_path, capsys):
    assert er.main(["--DR", str(tmp_path)]) == 2
    assert "needs data written by scripts/make_dance_data.py" in capsys.readouterr().err
    assert er.main(["--DR", str(tiny_dance), "--ckpt_path", str(tmp_path / "none.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert er.main(["--DR", str(tiny_dance), "--ckpt_path", "x.ckpt", "--device", "tpu"]) == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err
    dr = tmp_path / "DR"
    shutil.copytree(tiny_dance, dr)
    path = dr / "test" / "test_gt" / "1" / "frame3.png"
    a = np.asarray(Image.open(path)).copy()
    a[0, 0] ^= 255
    Image.fromarray(a).save(path)
    assert er.main(["--DR", str(dr)]) == 2
    assert "test sequence 1 is not what scripts/make_dance_data.py renders" in capsys.readouterr().err


def test_test_len_zero_or_one_frame_is_refused(tiny_dance, tmp_path, capsys):
    """--test_len 0 was read as "all" (and --help said "default: all", though any length but the
    dataset's is refused); test sequences of 1 frame printed tables of NaN."""
    assert "default: all" not in er.get_parser().format_help()
    for bad in ("0", "-3", "1"):
        assert er.main(["--DR", str(tiny_dance), "--test_len", bad]) == 2
        assert capsys.readouterr().err == \
            f"error: --test_len must be at least 2 (the dataset's length, the default), got {bad}\n"
    dr = tmp_path / "DR"  # as an older generator, which took --test_len 1, wrote it
    shutil.copytree(tiny_dance, dr)
    for k in ("0", "1"):
        for kind in ("test_gt", "test_label"):
            for i in range(1, 20):
                (dr / "test" / kind / k / f"frame{i}.png").unlink()
    made = json.loads((dr / "dataset.json").read_text())
    made["args"]["test_len"] = 1
    (dr / "dataset.json").write_text(json.dumps(made))
    assert er.main(["--DR", str(dr)]) == 2
    out = capsys.readouterr()
    assert "nan" not in out.out and out.err.count("\n") == 1
    assert out.err.startswith(f"error: {dr}: its test sequences have 1 frame") and "--test_len 2 or more" in out.err


def test_damaged_dataset_description_and_extra_sequences(tiny_dance, tmp_path, capsys):
    """A dataset.json cut short, and a test sequence folder the generator did not write, were
    tracebacks (JSONDecodeError, IndexError)."""
    dr = tmp_path / "DR"
    shutil.copytree(tiny_dance, dr)
    marker = dr / "dataset.json"
    text = marker.read_text()
    marker.write_text(text[:len(text) // 2])
    assert er.main(["--DR", str(dr)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {marker} does not describe a dataset written by scripts/make_dance_data.py")
    assert err.count("\n") == 1
    marker.write_text(text)
    for kind in ("test_img", "test_label", "test_gt"):
        shutil.copytree(dr / "test" / kind / "1", dr / "test" / kind / "7")
    assert er.main(["--DR", str(dr)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {dr}: test sequence(s) 7 are not among the 2 its dataset.json describes (added by "
                   "hand?); the analysis renders each sequence again\n")


def test_ctrl_c_is_one_line(tiny_dance, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(er, "analyse", interrupted)
    assert er.main(["--DR", str(tiny_dance)]) == 130
    assert capsys.readouterr().err == "error: interrupted; nothing written\n"

import json
import subprocess
import sys

from typer.testing import CliRunner

from twopass.pipeline.cli import app

runner = CliRunner()


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("synth", "evaluate", "show", "images"):
        assert cmd in r.stdout


def test_synth_evaluate_show(tmp_path):
    r = runner.invoke(app, ["synth", str(tmp_path / "d"), "--images", "3", "--size", "64", "--seed", "1"])
    assert r.exit_code == 0, r.output
    ann = tmp_path / "d" / "annotations.json"
    gt = json.loads(ann.read_text())
    res = [dict(a, score=1.0) for a in gt["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    r = runner.invoke(app, ["evaluate", "--ann", str(ann), "--results", str(tmp_path / "res.json"),
                            "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["segm"]["AP"] == 1.0
    assert "AP per category" in r.output
    r = runner.invoke(app, ["show", "--images", str(tmp_path / "d" / "images"), "--ann", str(ann),
                            "--results", str(tmp_path / "res.json"), "--out", str(tmp_path / "pics"), "--ids", "1,3"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["1.png", "3.png"]
    hidden = []  # every result scores 1.0: a display threshold above it leaves the ground truth alone
    for option in ("--display-score-thresh", "--score-thresh"):  # the second: its name until 2026-12
        r = runner.invoke(app, ["show", "--images", str(tmp_path / "d" / "images"), "--ann", str(ann), "--results",
                                str(tmp_path / "res.json"), "--out", str(tmp_path / option), "--ids", "1", option, "1.01"])
        assert r.exit_code == 0, r.output
        hidden.append((tmp_path / option / "1.png").read_bytes())
    assert hidden[0] == hidden[1] != (tmp_path / "pics" / "1.png").read_bytes()


def test_user_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "r.json").write_text("[]")
    r = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", "evaluate", "--ann", str(tmp_path / "nope.json"),
                        "--results", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"twopass: error: {tmp_path / 'nope.json'}: no such file"

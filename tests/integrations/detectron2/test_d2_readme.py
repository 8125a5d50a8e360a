"""The README's "Distill a detectron2 detector" commands run as written (in a scratch directory that
links the repository's integrations/), each with tiny overrides: a 16-image data set, 2 iterations,
batch 2. Covers the train tool (plain teacher config, KD config, --eval-only, --num-gpus 2 over gloo)
and export_student, and checks their outputs."""
import os
import re
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from d2_testing import ROOT, TINY, subprocess_env  # noqa: E402


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Distill a detectron2 detector"):]
    section = section[:section.index("\n## ", 5)]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("  #")[0]) for line in lines if line.strip()]


def tiny(cmd):
    """The command with this test's overrides (options before the KEY VALUE list is fine for both tools)."""
    if cmd[:3] == ["python", "-m", "kdops.toy_data"]:
        return cmd + ["--train", "16", "--val", "8"]
    if cmd[:3] == ["python", "-m", "kdops_detectron2.train"]:
        return cmd + TINY
    return cmd


def test_readme_commands_run(tmp_path):
    cmds = readme_commands()
    assert [c[2] for c in cmds] == ["kdops.toy_data"] + ["kdops_detectron2.train"] * 3 + [
        "kdops_detectron2.export_student", "kdops_detectron2.train"]
    os.symlink(os.path.join(ROOT, "integrations"), tmp_path / "integrations")
    env = subprocess_env()
    env.pop("KDOPS_TOY_DATA", None)
    for cmd in cmds:
        full = [sys.executable] + tiny(cmd)[1:]
        out = subprocess.run(full, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
        if "--eval-only" in cmd:
            assert "copypaste: AP,AP50" in out.stdout + out.stderr
    work = tmp_path / "work_dirs"
    assert (work / "d2_retinanet_r18_toy_teacher" / "model_final.pth").is_file()
    kd = torch.load(work / "d2_pkd_retinanet_toy" / "model_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("teacher.") for k in kd["model"]) and any(k.startswith("method.") for k in kd["model"])
    student = torch.load(work / "d2_pkd_student.pth", map_location="cpu", weights_only=False)["model"]
    assert set(student) == {k[len("student."):] for k in kd["model"] if k.startswith("student.")}
    assert (work / "d2_pkd_student.yaml").is_file()
    log = (work / "d2_pkd_retinanet_toy" / "metrics.json").read_text()
    assert "loss_pkd" in log and "kd_factor" in log

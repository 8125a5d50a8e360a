"""The repository documents itself (issue 21, points 4-5): docs/ holds the architecture and the
environment facts, nothing points outside the repository, the README's op table says what the
dispatcher says, and every public function, module and forward has its own docstring."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import kdops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = re.compile(r"(?<![\w/])(?:\.\./shared/)?(DESIGN|ENVIRONMENT)\.md")
#: files owned elsewhere that still name the old top-level files: drop an entry once it is edited
PENDING = set()


def tracked_text_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    for rel in out:
        if rel == "tests/test_docs.py":  # this file names them to look for them
            continue
        if rel.endswith((".py", ".md", ".sh", ".toml", ".cfg", ".txt")) or rel in ("Makefile",):
            path = os.path.join(ROOT, rel)
            if os.path.isfile(path):
                yield rel, open(path, encoding="utf-8", errors="replace").read()


def test_docs_folder_holds_architecture_and_environment():
    arch = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    env = open(os.path.join(ROOT, "docs", "environment.md")).read()
    assert "## 3. The op contract" in arch and "register_op(" in arch and "kdops/ops/_registry.py" in arch
    assert "CUDA_HOME" in env and "mmcv" in env and "cuda-13.0" in env and "How the Makefile uses them" in env
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "docs/architecture.md" in readme and "docs/environment.md" in readme


def test_nothing_points_at_files_outside_the_repository():
    bad = [f"{rel}: {m.group(0)}" for rel, text in tracked_text_files() if rel not in PENDING
           and not rel.startswith("docs/") for m in OUTSIDE.finditer(text)]
    assert not bad, "name docs/architecture.md or docs/environment.md instead:\n" + "\n".join(bad)


def test_pending_files_are_fixed():
    texts = dict(tracked_text_files())
    assert not [rel for rel in PENDING if rel in texts and OUTSIDE.search(texts[rel])]


def readme_backends():
    """op -> (CPU cell, CUDA cell) of the README's op table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("| op | what | papers | CPU | CUDA |"):]
    out = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        for op in re.findall(r"kdops\.(\w+)\(", cells[0]):
            out[op] = (cells[-2], cells[-1])
    return out


def info_backends():
    out = subprocess.run([sys.executable, "-m", "kdops.cli", "info"], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in dict(os.environ, PYTHONPATH=ROOT).items() if k != "KDOPS_BACKEND"})
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^  (\w+)\s+cpu: (.+?)\s+cuda: (.+)$", out.stdout, re.M)
    return {op: (cpu.strip(), cuda.strip()) for op, cpu, cuda in rows}


@pytest.mark.skipif(not kdops.HAS_C, reason="the README describes the built extension")
def test_readme_op_table_agrees_with_the_dispatcher():
    readme, info = readme_backends(), info_backends()
    assert set(readme) == set(kdops.ops.__all__) == set(info)
    for op, (cpu, cuda) in readme.items():
        got_cpu, got_cuda = info[op]
        assert cpu == got_cpu, f"{op}: README says CPU {cpu!r}, `kdops info` {got_cpu!r}"
        # a cell may name an alternative in brackets: "CUDA C++ (Triton via KDOPS_MSDA_BACKEND=triton)";
        # which one `kdops info` reports depends on whether the build compiled the CUDA sources
        main, _, alt = cuda.partition(" (")
        assert got_cuda == main or got_cuda in alt, f"{op}: README says CUDA {cuda!r}, `kdops info` {got_cuda!r}"


def public_objects():
    for name in kdops.__all__:
        obj = getattr(kdops, name)
        if callable(obj):
            yield f"kdops.{name}", obj
    for mod in (kdops.losses, kdops.nn):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj):
                yield f"{mod.__name__}.{name}", obj


def test_every_public_function_and_module_has_a_docstring():
    missing = [q for q, obj in public_objects() if not (obj.__doc__ or "").strip()]
    mods = ["kdops", "kdops.losses", "kdops.nn", "kdops.reference", "kdops.bench", "kdops.cli"]
    mods += [f"kdops.ops.{op}" for op in kdops.ops.__all__ if op not in ("box_paint",)]
    mods += [f"kdops.losses.{m}" for m in ("pkd", "feature_mimic", "bckd", "fgd")]
    missing += [m for m in mods if not (importlib.import_module(m).__doc__ or "").strip()]
    assert not missing, missing


OWN_FORWARD_PENDING = set()


def modules_forward():
    for q, obj in public_objects():
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            yield q, obj


@pytest.mark.parametrize("qual,cls", [m for m in modules_forward() if m[0] not in OWN_FORWARD_PENDING])
def test_forward_has_its_own_docstring_with_shapes_and_paper(qual, cls):
    doc = cls.forward.__doc__ or ""
    assert doc and doc != torch.nn.Module.forward.__doc__, f"help({qual}.forward) shows nn.Module's placeholder"
    assert re.search(r"\([A-Za-z]+,", doc), f"{qual}.forward: no shapes"
    if qual != "kdops.nn.GcBlock":
        assert re.search(r"et al\.|ICLR|ICCV|CVPR|NeurIPS|AAAI", doc), f"{qual}.forward: no paper"


def test_bckd_forward_documents_the_priors_convention():
    doc = kdops.losses.BCKDLoss.forward.__doc__
    assert "(N,J·K,H,W)" in doc and "top-left corner" in doc and "cell centre" in doc

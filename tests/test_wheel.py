"""The built wheel carries the world's weights: installed into a fresh venv, the default `generate` runs.

The wheel is built from a copy of the package's files (the checkout's build/ is left alone), with
no network: `pip wheel --no-build-isolation --no-index`, then installed with `--no-index
--no-deps` into a venv that sees this interpreter's packages (torch, numpy, ...) but not the
checkout. The venv's reflectionflow and its weights must both come from the venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 100 * 1024 * 1024  # PyPI's default file size limit
NEEDED = ("world-generator/model.safetensors", "world-generator/config.json",
          "world-generator-v1/model.safetensors", "world-corrector/lora.safetensors",
          "world-corrector/corrector.json", "world-corrector-kv/lora.safetensors",
          "world-corrector-partial/lora.safetensors", "world-corrector-kv-partial/lora.safetensors",
          "world-verifier/model.safetensors", "world-reflector/model.safetensors", "MODEL_CARD.md")


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _installed_here() -> str | None:
    proc = subprocess.run([sys.executable, "-m", "pip", "show", "reflectionflow"], capture_output=True, text=True,
                          env=_clean_env(), timeout=120)
    return proc.stdout if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", symlinks=True, ignore=ignore)  # src/reflectionflow/weights: a link
    shutil.copytree(ROOT / "weights", src / "weights", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, env=_clean_env(),
                          cwd=src, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("reflectionflow-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_weights_and_stays_small(wheel):
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, f"{wheel.stat().st_size / 2**20:.1f} MiB"
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in NEEDED if f"reflectionflow/weights/{n}" not in names]
    assert not missing, missing
    for n in NEEDED:  # byte for byte what the repository ships
        with zipfile.ZipFile(wheel) as z:
            assert z.read(f"reflectionflow/weights/{n}") == (ROOT / "weights" / n).read_bytes(), n


@pytest.mark.slow
def test_installed_wheel_runs_the_default_generate(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = _clean_env()
    # This interpreter's pip runs inside the venv (--python), so the venv needs no pip of its own and
    # the install can touch nothing outside it (--ignore-installed: nothing is uninstalled anywhere).
    before = _installed_here()
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index",
                           "--no-deps", "--ignore-installed", "--no-warn-script-location", str(wheel)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _installed_here() == before  # this interpreter's own installation is untouched
    work = tmp_path / "work"  # not the checkout: nothing of the source tree on the path
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import reflectionflow, reflectionflow.shipped as s; "
                            "print(reflectionflow.__file__); print(s.WEIGHTS_DIR)"],
                           capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module, weights = where.stdout.split()
    venv_root = str(env_dir.resolve())
    assert module.startswith(venv_root) and weights.startswith(venv_root), where.stdout
    assert str(ROOT) not in where.stdout

    exe = env_dir / "bin" / "reflectionflow"
    assert exe.is_file()
    run = subprocess.run([str(py), str(exe), "generate", "a photo of a red circle and a blue square",
                          "--out", "runs/one", "--quiet"],
                         capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1/1 prompts, 8 images" in run.stdout, run.stdout
    assert (work / "runs/one/00000/samples/0000.png").is_file()
    config = (work / "runs/one/config.json").read_text()
    assert "world-mmdit" in config and "world-learned" in config

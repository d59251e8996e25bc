"""``pip install .`` into a fresh venv gives a working ``chatvlm`` command and ``python -m chatvlm``.

A full install pulls torch and friends (about 5.5 GB, minutes), so the fresh venv sees the test
venv's installed packages through a .pth file and the project is installed with ``--no-deps``
(and ``--no-build-isolation``: setuptools comes from there too, no download). What this checks is
the packaging itself: the build, the entry point, the packages and data files in the wheel
(the playground's static files, the default config.yaml), and that the installed copy runs
from another directory without the source tree."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from tests.cli.conftest import SAMPLES
from tests.server_process import ROOT

IGNORE = shutil.ignore_patterns(".venv", ".git", "tests", "data", "weights", "tiny_models", "build", "*.egg-info",
                                "__pycache__", ".pytest_cache", "docs")


def test_pip_install_gives_the_chatvlm_command(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=IGNORE, symlinks=True)  # the build writes build/ beside the sources
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ensurepip's old setuptools would shadow the shared one (which builds wheels on its own).
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], capture_output=True, timeout=120)
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"  # not the source tree: imports must come from the install
    work.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "CHATVLM_DATA_DIR": str(tmp_path / "d"),
           "TMPDIR": str(tmp_path)}
    chatvlm = env_dir / "bin" / "chatvlm"
    assert chatvlm.exists()
    for cmd in ([str(chatvlm), "--help"], [str(python), "-m", "chatvlm", "--help"]):
        run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "ocr" in run.stdout and "serve" in run.stdout, run.stderr
    where = subprocess.check_output([python, "-c", "import chatvlm, server.ui, api; print(chatvlm.__file__); "
                                     "print(server.ui.STATIC_DIR); print(api.__file__)"], cwd=work, env=env, text=True)
    assert all(line.startswith(str(site)) for line in where.split()), where
    assert (Path(where.split()[1]) / "index.html").is_file() and (Path(where.split()[1]) / "app.js").is_file()
    assert (env_dir / "share" / "chatvlm" / "config.yaml").is_file()

    # The installed command reads the default config and OCRs a folder, from anywhere.
    shutil.copytree(SAMPLES, work / "samples")
    run = subprocess.run([str(chatvlm), "ocr", "samples/receipt_en.png", "--out", "out.jsonl",
                          "--models-dir", str(tmp_path / "weights")], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    record = json.loads((work / "out.jsonl").read_text(encoding="utf-8"))
    assert record["status"] == "ok" and "CORNER MARKET" in record["result"]["text"]
    assert sys.prefix != str(env_dir)  # the test itself ran from the project venv

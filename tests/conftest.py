"""Every test runs in its own empty working directory with a clean environment:
no API key, no base URL, no SLURM variables, the Hugging Face hubs offline, and an answer
cache of its own beside that directory (never the user's ~/.cache)."""

import os

import pytest

SCRUBBED = ("OPENAI_API_KEY", "OPENAI_ADMIN_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG",
            "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
            "SLURM_RESTART_COUNT", "DATAGEN_LOG_LEVEL")


@pytest.fixture(scope="session", autouse=True)
def no_user_cache(tmp_path_factory):
    """Set before any fixture of a wider scope runs a command (tests/test_runs.py generates
    once per module): the answer cache is never the user's."""
    saved = os.environ.get("DATAGEN_CACHE_DIR")
    os.environ["DATAGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("answer-cache"))
    yield
    if saved is None:
        os.environ.pop("DATAGEN_CACHE_DIR", None)
    else:
        os.environ["DATAGEN_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("DATAGEN_CACHE_DIR", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    yield tmp_path

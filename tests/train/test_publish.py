"""Model card and ``run.push_to_hub`` (usability issue, item 5): the card describes the run; the push uploads
final/ with the token from the environment; offline, the error keeps the run and says how to upload later."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from mmalign.api import load_train_config, train
from mmalign.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = ["run.max_steps=1", "run.batch_size=4", "run.progress=false", "data.eval=[]"]


def test_model_card_written(tmp_path):
    summary = train(ROOT / "configs/text/tiny_dpo.yaml", [*BASE, f"run.output_dir={tmp_path / 'o'}"])
    card = Path(summary["model_card"]).read_text()
    assert card.startswith("---\nlibrary_name: mmalign\n") and "- dpo" in card
    assert "loss `dpo` (beta=" in card and "| main | loss |" in card and "AutoModelForCausalLM" in card
    assert Path(summary["model_card"]).parent == tmp_path / "o" / "final"


def test_push_uploads_final_with_env_token(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    summary = train(ROOT / "configs/text/tiny_dpo.yaml",
                    [*BASE, f"run.output_dir={tmp_path / 'o'}", "run.push_to_hub=me/tiny-dpo"])
    assert summary["pushed_to"] == "https://huggingface.co/me/tiny-dpo"
    assert calls[0] == ("token", "hf_test") and calls[1] == ("create", "me/tiny-dpo", True)
    assert calls[2][0] == "upload" and "README.md" in calls[2][1] and "model.safetensors" in calls[2][1]


def test_push_offline_keeps_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"upload failed .*saved in .*final.*hf upload me/x"):
        train(ROOT / "configs/text/tiny_dpo.yaml", [*BASE, f"run.output_dir={out}", "run.push_to_hub=me/x"])
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "README.md").is_file()


@pytest.mark.parametrize(("overrides", "match"), [
    (["run.push_to_hub=not a repo"], "is not a hub repo id"),
    (["run.push_to_hub=me/x", "run.save_final=false"], "save_final=false does not write"),
])
def test_bad_push_settings_refused_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(ROOT / "configs/text/tiny_dpo.yaml", overrides)

"""Config: YAML + env vars + overrides, with errors that name the key and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridgerec.config import ConfigError, load_settings


def test_yaml_then_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workspace: /data/ws\ningest:\n  min_interactions: 4\n  kcore:\n    user_min: 7\n")
    monkeypatch.setenv("BRIDGEREC_INGEST__KCORE__ITEM_MIN", "9")
    monkeypatch.setenv("BRIDGEREC_INGEST__MIN_INTERACTIONS", "6")
    s = load_settings(cfg)
    assert s.workspace == Path("/data/ws")
    assert s.ingest.kcore.user_min == 7  # from YAML, deep-merged with env below
    assert s.ingest.kcore.item_min == 9  # from env
    assert s.ingest.min_interactions == 6  # env beats YAML
    assert load_settings(cfg, {"workspace": Path("/x")}).workspace == Path("/x")  # init beats all


def test_config_file_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  source: amazon2018\n")
    monkeypatch.setenv("BRIDGEREC_CONFIG", str(cfg))
    s = load_settings()
    assert s.ingest.source == "amazon2018"
    assert s.ingest.kcore_enabled  # on by default for Amazon sources
    assert not load_settings(None, {"ingest": {"source": "generic"}}).ingest.kcore_enabled


def test_bad_value_names_key_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGEREC_INGEST__KCORE__USER_MIN", "-3")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "ingest.kcore.user_min" in str(err.value)
    assert "-3" in str(err.value)
    assert "BRIDGEREC_INGEST__KCORE__USER_MIN" in str(err.value)


def test_unknown_key_and_bad_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  min_interaction: 4\n")  # typo
    with pytest.raises(
        ConfigError, match=r"ingest\.min_interaction.*did you mean 'ingest\.min_interactions'"
    ) as one:
        load_settings(cfg)
    assert "\n" not in str(one.value)  # one fault, one line: "invalid configuration: ingest.min_..."
    cfg.write_text("trian:\n  epochs: 4\nxyzzy: 1\n")  # a misspelt section; a key like no setting
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "trian: no such setting, did you mean 'train'?" in str(err.value)
    assert "xyzzy = 1: no such setting (YAML key" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_settings(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  model: [unclosed\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    # one line: the file, where and what (not PyYAML's several lines about "<unicode string>")
    assert str(err.value).startswith(f"config file {bad} is not valid YAML: line 3, column 9: ")
    assert "\n" not in str(err.value) and "unicode" not in str(err.value)


def test_min_interactions_floor() -> None:
    with pytest.raises(ConfigError, match="min_interactions"):
        load_settings(None, {"ingest.min_interactions": 2})


def test_overrides_merge_key_by_key_the_same_for_cli_and_flows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dotted keys (CLI options) and nested mappings (flow parameters) are one path: merged key by key
    over the file and env, None meaning "not given"."""
    from bridgerec.flows.nightly import resolve_settings

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 7\n  hidden: 32\npublish:\n  k: 5\n")
    monkeypatch.setenv("BRIDGEREC_TRAIN__LAYERS", "3")
    dotted = load_settings(cfg, {"train.epochs": 2, "publish.k": None, "warehouse": None})
    nested = resolve_settings(str(cfg), {"train": {"epochs": 2}})
    assert dotted == nested
    assert (dotted.train.epochs, dotted.train.hidden, dotted.train.layers, dotted.publish.k) == (2, 32, 3, 5)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        resolve_settings(str(cfg), {"train": {"epochs": 0}})


# A run recorded before the later switches existed, every other field spelled out: its run id must not
# change when a switch is added (add it to `TrainSettings.hashed_since` at the value these runs had).
_EARLY_RUN = dict(
    hidden=128, layers=2, heads=1, dropout=0.2, max_len=200, causal=True, objective="sampled_softmax",
    negatives=1024, sampling="popularity", select_by="full", adapter_init="xavier", alpha=0.1, beta=0.1,
    tau=1.0, lr=1e-3, weight_decay=0.0, batch_size=128, epochs=200, patience=20, time_budget_s=None,
    eval_negatives=100, short_history=5, full_ranking=True, seed=42, deterministic=False,
    domain_start=True,  # id_embeddings: the field's default (False), which the hybrid preset sets True
)  # fmt: skip


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llm4cdsr-hybrid", "1a6b1bbbcf2c023ae9461740704ba195"),
        ("sasrec", "c50685f4b475b86bb185a8a0b808c747"),
        ("pop", "443c407e36475fc5c8a59da315773b2b"),
    ],
)
def test_early_run_ids_survive_new_switches(model: str, expected: str) -> None:
    from bridgerec.storage.workspace import config_hash
    from bridgerec.tasks.train import TrainSettings

    early = TrainSettings(model=model, **_EARLY_RUN, **dict(TrainSettings.hashed_since))
    assert config_hash(early) == expected
    # how a run goes or starts is not part of its id
    assert config_hash(early.model_copy(update={"threads": 3, "warm_start": False})) == expected
    # a switch away from its earlier value is
    assert config_hash(early.model_copy(update={"block": "sasrec"})) != expected


def test_a_setting_the_model_preset_contradicts_is_an_error() -> None:
    """`model: llm4cdsr-noprofile` with `beta: 0.2` trained with beta 0, silently (a new contributor's
    trial): a switch set by hand that the preset sets otherwise is a config error naming both."""
    from bridgerec.tasks.train import TrainSettings

    with pytest.raises(
        ValueError, match=r"model 'llm4cdsr-noprofile' sets beta: 0\.2 \(the preset's: 0\.0\)"
    ):
        TrainSettings(model="llm4cdsr-noprofile", beta=0.2)
    with pytest.raises(ConfigError, match=r"id_embeddings: False"):
        load_settings(None, {"train.model": "llm4cdsr-hybrid", "train.id_embeddings": False})
    # the preset's own value, or a switch it leaves alone, is fine; the preset applies where unset
    assert TrainSettings(model="llm4cdsr-noprofile", beta=0.0, alpha=0.3).alpha == 0.3
    assert TrainSettings(model="llm4cdsr-hybrid").id_embeddings  # the settings hold the preset's switches
    assert TrainSettings(model="llm4cdsr-noprofile").beta == 0.0


def test_train_settings_survive_their_own_dump() -> None:
    """A dump sets every field, the preset's switches among them: it must validate again (a benchmark's
    child process and a data-parallel job's workers read the settings so; both failed for the default
    model once the preset check came in), with the preset applied and the same config hash."""
    from bridgerec.storage.workspace import config_hash
    from bridgerec.tasks.train import MODEL_PRESETS, TrainSettings
    from bridgerec.tasks.train.distributed import DataParallelJob

    for model in MODEL_PRESETS:
        settings = TrainSettings(model=model, seed=43)
        again = TrainSettings.model_validate_json(settings.model_dump_json())
        assert again == settings
        assert config_hash(again) == config_hash(settings)
        job = DataParallelJob(settings=settings, workspace="ws", run_id="r", threads=1, warm=False, init={})
        assert DataParallelJob.model_validate_json(job.model_dump_json()).settings == settings
    # what the user set stays what they set: the preset's values are not marked as set
    assert TrainSettings(model="llm4cdsr-hybrid").model_fields_set == {"model"}


def test_declared_hash_fields_are_fields() -> None:
    """`not_hashed` and `hashed_since` name real fields of every stage's settings (a typo would hash a
    field that should not be, or fail to keep an old id)."""
    from bridgerec.config import Settings
    from bridgerec.storage.workspace import StageSettings

    sections = [f.annotation for f in Settings.model_fields.values()]
    stages = [s for s in sections if isinstance(s, type) and issubclass(s, StageSettings)]
    assert {s.__name__ for s in stages} >= {
        "IngestSettings",
        "EnrichSettings",
        "TrainSettings",
        "PublishSettings",
    }
    for section in stages:
        for key in set(section.not_hashed) | set(section.hashed_since):
            model: Any = section
            for part in key.split("."):  # "section.field": a field of a nested section
                assert part in model.model_fields, (section.__name__, key)
                model = model.model_fields[part].annotation
    # A nested field added later leaves the hash of configs without it as it was.
    from bridgerec.tasks.ingest import IngestSettings
    from bridgerec.tasks.ingest.settings import TimestampSettings

    plain = IngestSettings().hashed_values()["timestamps"]
    assert "format" not in plain and "naive_zone" in plain
    spreadsheet = IngestSettings(timestamps=TimestampSettings(format="%m/%d/%Y"))
    assert spreadsheet.hashed_values()["timestamps"]["format"] == "%m/%d/%Y"


def test_new_items_scale_is_chosen_on_validation_by_default_and_by_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.text_prior_new_items: chosen on validation (None) by default, from a grid whose floor is
    1.25, where the model starts; "validation" (file or env) or null say the same; a number fixes it; a
    word that is neither names the key."""
    train = load_settings(None).train
    assert train.text_prior_new_items is None and min(train.text_prior_new_items_grid) == 1.25
    assert train.model_spec().text_prior_new_items == 1.25  # the floor until validation chooses
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  text_prior_new_items: validation\n  text_prior_new_items_grid: [1.1, 2]\n")
    train = load_settings(cfg).train
    assert train.text_prior_new_items is None and train.model_spec().text_prior_new_items == 1.1
    cfg.write_text("train:\n  text_prior_new_items: 1.5\n")
    assert load_settings(cfg).train.model_spec().text_prior_new_items == 1.5
    monkeypatch.setenv("BRIDGEREC_TRAIN__TEXT_PRIOR_NEW_ITEMS", "validation")
    assert load_settings(cfg).train.text_prior_new_items is None  # env beats the file
    monkeypatch.setenv("BRIDGEREC_TRAIN__TEXT_PRIOR_NEW_ITEMS", "often")
    with pytest.raises(ConfigError, match=r"train\.text_prior_new_items"):
        load_settings(None)
    monkeypatch.delenv("BRIDGEREC_TRAIN__TEXT_PRIOR_NEW_ITEMS")
    # The new-item targets weigh as many as they are in the choice, or the catalogue's share when told.
    assert load_settings(None).train.text_prior_new_items_share == "validation"
    monkeypatch.setenv("BRIDGEREC_TRAIN__TEXT_PRIOR_NEW_ITEMS_SHARE", "catalogue")
    assert load_settings(None).train.text_prior_new_items_share == "catalogue"
    monkeypatch.setenv("BRIDGEREC_TRAIN__TEXT_PRIOR_NEW_ITEMS_SHARE", "test")
    with pytest.raises(ConfigError, match=r"train\.text_prior_new_items_share"):
        load_settings(None)


def test_id_text_knn_default_env_and_where_it_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """id_text_knn: 10 by default (the hybrid's new items take their text neighbours' rows), 0 for the
    ridge map, set by env; a negative k is refused naming the key; without id_text_fit it changes
    nothing, so it is left out of the run id."""
    from bridgerec.storage.workspace import config_hash

    train = load_settings(None).train
    assert train.id_text_knn == 10 and train.model_spec().id_text_knn == 10
    monkeypatch.setenv("BRIDGEREC_TRAIN__ID_TEXT_KNN", "0")
    assert load_settings(None).train.model_spec().id_text_knn == 0
    assert config_hash(load_settings(None).train) != config_hash(train)
    monkeypatch.setenv("BRIDGEREC_TRAIN__ID_TEXT_KNN", "-1")
    with pytest.raises(ConfigError, match=r"train\.id_text_knn"):
        load_settings(None)
    ridge_less = train.model_copy(update={"id_text_fit": False})
    assert config_hash(ridge_less) == config_hash(ridge_less.model_copy(update={"id_text_knn": 3}))


def test_profiles_select_by_env_and_where_it_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """profiles.select: first by default and left out of the hash there (earlier enrich outputs keep
    theirs), shortest by env changes it with a cap only (without max_users every user is profiled); an
    unknown value is refused naming the key."""
    from bridgerec.storage.workspace import config_hash

    profiles = load_settings(None).profiles
    assert profiles.select == "first" and "select" not in profiles.hashed_values()
    monkeypatch.setenv("BRIDGEREC_PROFILES__SELECT", "shortest")
    shortest = load_settings(None).profiles
    assert shortest.select == "shortest" and config_hash(shortest) == config_hash(profiles)
    capped = profiles.model_copy(update={"max_users": 100})
    assert config_hash(shortest.model_copy(update={"max_users": 100})) != config_hash(capped)
    monkeypatch.setenv("BRIDGEREC_PROFILES__SELECT", "longest")
    with pytest.raises(ConfigError, match=r"profiles\.select"):
        load_settings(None)


def test_a_misspelled_section_in_an_env_var_is_refused_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings reads only the variables of known fields: BRIDGEREC_TRIAN__EPOCHS would be
    ignored without a word (a new user's trial), so it is refused, naming the variable and the one meant.
    Variables without `__` (BRIDGEREC_CONFIG, BRIDGEREC_VERBOSE) are not section settings and pass."""
    monkeypatch.setenv("BRIDGEREC_VERBOSE", "1")
    monkeypatch.setenv("BRIDGEREC_TRIAN__EPOCHS", "2")
    with pytest.raises(
        ConfigError,
        match=r"BRIDGEREC_TRIAN__EPOCHS: no such setting section 'trian', did you mean BRIDGEREC_TRAIN__EPOCHS\?",
    ):
        load_settings()
    monkeypatch.delenv("BRIDGEREC_TRIAN__EPOCHS")
    monkeypatch.setenv("BRIDGEREC_TRAIN__EPOCHS", "2")
    assert load_settings().train.epochs == 2


def test_set_gives_one_command_its_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set KEY=VALUE` (YAML values, repeatable) beats the config file and env vars for that command
    only, and a bad one is one `error:` line with exit 2."""
    import json

    from typer.testing import CliRunner

    from bridgerec.cli import app

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 9\n  lr: 0.002\npublish:\n  k: 5\n")
    monkeypatch.setenv("BRIDGEREC_TRAIN__LR", "0.004")

    def show(*argv: str) -> dict:
        out = CliRunner().invoke(app, ["config", "show", "--config", str(config), *argv, "--json"])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    base = show()
    assert (base["train"]["epochs"], base["train"]["lr"], base["publish"]["k"]) == (9, 0.004, 5)
    shown = show(
        "--set", "train.epochs=3", "--set", "train.lr=1e-3", "--set", "ingest.domains=[food, kitchen]"
    )
    assert (shown["train"]["epochs"], shown["train"]["lr"], shown["publish"]["k"]) == (3, 0.001, 5)
    assert shown["ingest"]["domains"] == ["food", "kitchen"]
    assert load_settings(config).train.epochs == 9  # nothing stays behind for the next command
    for argv, said in (
        (["--set", "train.epoch=3"], "no such setting, did you mean 'train.epochs'?"),
        (["--set", "train"], "--set takes KEY=VALUE"),
        (["--set", "train.epochs=[3"], "is not a YAML value"),
    ):
        out = CliRunner().invoke(app, ["config", "show", "--config", str(config), *argv])
        assert out.exit_code == 2 and out.stderr.startswith("error: ") and said in out.stderr, out.output
        assert out.stderr.count("\n") == 1


def test_the_settings_reference_is_the_docs_and_describes_every_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/settings.md is `bridgerec config show --reference` (regenerate it after a settings change:
    `bridgerec config show --reference > docs/settings.md`), the same on any machine, and every setting
    says what it does (a new contributor found eleven that no doc mentioned)."""
    import json
    import os

    from typer.testing import CliRunner

    from bridgerec.cli import app
    from bridgerec.tasks.enrich import model_cache

    doc = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    out = CliRunner().invoke(app, ["config", "show", "--reference"])
    assert out.exit_code == 0 and out.stdout == doc, "docs/settings.md is stale: regenerate it"
    monkeypatch.setenv("XDG_CACHE_HOME", "/elsewhere")  # the model cache's place does not show through
    assert CliRunner().invoke(app, ["config", "show", "--reference"]).stdout == doc
    rows = json.loads(CliRunner().invoke(app, ["config", "show", "--reference", "--json"]).stdout)["settings"]
    assert len(rows) > 150 and [r["key"] for r in rows if not r["description"]] == []
    epochs = next(r for r in rows if r["key"] == "train.epochs")
    assert (epochs["section"], epochs["env"]) == ("train", "BRIDGEREC_TRAIN__EPOCHS")
    assert f"| `train.epochs` | `{epochs['default']}` | `BRIDGEREC_TRAIN__EPOCHS` |" in doc
    # every default is the one in effect: `config show`'s (an inner section's defaults set by its parent,
    # `profiles.engine`, and train's preset showed the inner class's own: 0.4 for 0.7, false for true)
    for name in [k for k in os.environ if k.startswith("BRIDGEREC_")]:
        monkeypatch.delenv(name)
    shown = json.loads(CliRunner().invoke(app, ["config", "show", "--json"]).stdout)
    for r in rows:
        value = shown
        for part in r["key"].split("."):
            value = value[part]
        if r["key"] != "warehouse":  # config show gives the file the commands use, not the setting
            text = "unset" if value is None else '""' if value == "" else json.dumps(value).strip('"')
            assert r["default"] == text.replace(str(model_cache()), "~/.cache/bridgerec/models"), r["key"]
    # each is a real setting: its env var sets it
    monkeypatch.setenv("BRIDGEREC_TRAIN__EPOCHS", "3")
    assert load_settings(None).train.epochs == 3

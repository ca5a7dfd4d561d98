"""docs/configuration.md is generated from the models: it must say what the code accepts."""

from pathlib import Path

from safekit_cloud.core import config
from safekit_cloud.core.configdoc import SECTIONS, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `.venv/bin/python -m safekit_cloud.core.configdoc "
        "> docs/configuration.md`"
    )


def test_every_key_is_described() -> None:
    undocumented = [f"{title}.{name}" for title, model in SECTIONS
                    for name, info in model.model_fields.items() if not info.description]
    assert not undocumented, undocumented


def test_every_section_model_is_in_the_reference() -> None:
    listed = {model for _, model in SECTIONS}
    models = {getattr(config, n) for n in dir(config)
              if isinstance(getattr(config, n), type) and issubclass(getattr(config, n), config.Strict)
              and getattr(config, n) not in (config.Strict, config.CheckerBase)}
    assert models <= listed, sorted(m.__name__ for m in models - listed)

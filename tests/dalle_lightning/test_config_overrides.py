from dataclasses import dataclass

import pytest

from dalle_lightning.config_overrides import build, load_sections, parse_overrides


@dataclass
class _Cfg:
    timeout: int = 10
    ratio: float = 0.5
    flag: bool = True
    names: tuple[str, ...] = ("a",)
    maybe: int | None = None


def test_overrides_are_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("download:\n  timeout: 3\n")
    sections = load_sections(
        tmp_path / "c.yaml", ["download.ratio=1", "download.flag=false", "download.names=[x, y]"]
    )
    cfg = build(_Cfg, sections["download"], "download")
    assert cfg == _Cfg(timeout=3, ratio=1.0, flag=False, names=("x", "y"))


def test_bad_overrides_name_the_field():
    with pytest.raises(ValueError, match="unknown field 'timout'"):
        build(_Cfg, {"timout": 3}, "download")
    with pytest.raises(ValueError, match="download.timeout: expected int"):
        build(_Cfg, {"timeout": "soon"}, "download")
    with pytest.raises(ValueError, match="section.field=value"):
        parse_overrides(["timeout=3"])

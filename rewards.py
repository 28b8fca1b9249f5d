"""Output parsing, rulebooks and rewards for LLM relevance judges.

A rulebook is an ordered list of criteria (each with its allowed values) and a decision function that
maps a full set of criterion values to a label, first matching rule wins (METHOD.md section 3).
A model answers with a label, one line per criterion and a short reason (section 2); `parse_output`
reads that strictly and never raises; `score_output` turns it into the rewards of section 4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

UNKNOWN = "unknown"  # a gold criterion value that the data does not determine: masked, never guessed


@dataclass(frozen=True)
class Criterion:
    name: str
    values: tuple[str, ...]
    question: str  # what the criterion asks, shown to the model in the system prompt


@dataclass(frozen=True)
class Rulebook:
    name: str
    labels: tuple[str, ...]  # best level first
    criteria: tuple[Criterion, ...]
    rules: tuple[str, ...]  # the decision rules in words, in the order `decide` applies them
    decide: Callable[[dict[str, str]], str]

    @property
    def criterion_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.criteria)

    def allowed(self, name: str) -> tuple[str, ...]:
        return next(c.values for c in self.criteria if c.name == name)


# --- The 4-level scale of the TaoSR papers: Excellent > Related > Mismatch > Irrelevant -------------
def _decide_taobao4(v: dict[str, str]) -> str:
    attributes = (v["brand"], v["color"], v["specs"])
    if v["category"] == "mismatch":
        return "Irrelevant"
    if v["category"] == "match" and ("conflict" in attributes or v["negation"] == "violated"):
        return "Mismatch"
    if v["category"] == "related" or "unstated" in attributes:
        return "Related"
    return "Excellent"


TAOBAO4 = Rulebook(
    name="taobao4",
    labels=("Excellent", "Related", "Mismatch", "Irrelevant"),
    criteria=(
        Criterion("category", ("match", "related", "mismatch"), "is the item the product type the query asks for?"),
        Criterion(
            "brand", ("match", "conflict", "unstated", "n/a"), "does the item meet the query's brand requirement?"
        ),
        Criterion("color", ("match", "conflict", "unstated", "n/a"), "does the item have the requested color?"),
        Criterion(
            "specs", ("match", "conflict", "unstated", "n/a"), "does it meet the requested material, audience and size?"
        ),
        Criterion(
            "negation", ("satisfied", "violated", "n/a"), 'does it avoid what the query excludes ("without ...")?'
        ),
    ),
    rules=(
        "category mismatch -> Irrelevant",
        "category match and a requested attribute in conflict, or negation violated -> Mismatch",
        "category only related, or a requested attribute unstated -> Related",
        "everything satisfied -> Excellent",
    ),
    decide=_decide_taobao4,
)


# --- ESCI (Amazon Shopping Queries): Exact > Substitute > Complement > Irrelevant -------------------
def _decide_esci(v: dict[str, str]) -> str:
    if v["product_type"] == "different":
        return "Irrelevant"
    if v["product_type"] == "complement":
        return "Complement"
    if v["product_type"] == "same" and v["specs"] == "met" and v["brand"] != "conflict":
        return "Exact"
    return "Substitute"


ESCI = Rulebook(
    name="esci",
    labels=("Exact", "Substitute", "Complement", "Irrelevant"),
    criteria=(
        Criterion(
            "product_type",
            ("same", "substitute", "complement", "different"),
            "is the item the queried product type, a functional substitute, something used with it, or unrelated?",
        ),
        Criterion("specs", ("met", "unmet"), "does the item satisfy every specification stated in the query?"),
        Criterion("brand", ("match", "conflict", "n/a"), "does the item's brand match a brand named in the query?"),
    ),
    rules=(
        "different product type -> Irrelevant",
        "a different type used together with the queried one -> Complement",
        "same product type, all specs met and no brand conflict -> Exact",
        "otherwise (a substitute, or a spec unmet) -> Substitute",
    ),
    decide=_decide_esci,
)

RULEBOOKS: dict[str, Rulebook] = {TAOBAO4.name: TAOBAO4, ESCI.name: ESCI}


def infer_esci_criteria(label: str, query: str, brand: str) -> dict[str, str]:
    """Gold criteria that the ESCI label and the item metadata determine; everything else is unknown.

    Exact implies the same product type with every spec met; Complement implies a complementary type;
    Irrelevant a different type. Substitute leaves type and specs open (same type with a spec unmet,
    or a functional substitute). A brand named in the query that the item carries is a match.
    """
    criteria = {"product_type": UNKNOWN, "specs": UNKNOWN, "brand": UNKNOWN}
    if label == "Exact":
        criteria.update(product_type="same", specs="met")
    elif label == "Complement":
        criteria["product_type"] = "complement"
    elif label == "Irrelevant":
        criteria["product_type"] = "different"
    brand = (brand or "").strip().lower()
    if len(brand) >= 2 and re.search(r"(?<!\w)" + re.escape(brand) + r"(?!\w)", query.lower()):
        criteria["brand"] = "match"
    return criteria


# --- Output format and parsing ---------------------------------------------------------------------
ORDERS = ("label_first", "think_first")  # respond-then-think (the papers' post-CoT) or think-then-respond


def format_output(
    label: str, criteria: dict[str, str], reason: str, rulebook: Rulebook, order: str = "label_first"
) -> str:
    """The exact text a well-formed answer has; SFT targets and guidance are built with it."""
    label_part = f"<label>{label}</label>"
    criteria_lines = "\n".join(f"{name}: {criteria[name]}" for name in rulebook.criterion_names)
    think_part = f"<criteria>\n{criteria_lines}\n</criteria>\n<reason>{reason}</reason>"
    return f"{label_part}\n{think_part}" if order == "label_first" else f"{think_part}\n{label_part}"


@dataclass
class Parsed:
    label: str | None = None  # a valid label of the rulebook, else None
    criteria: dict[str, str] = field(default_factory=dict)  # stated values that are allowed
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # char span of each criterion's line
    reason: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def format_ok(self) -> bool:
        return not self.errors


_TAGS = ("label", "criteria", "reason")
_LINE = re.compile(r"([A-Za-z_/]+)\s*:(.*)")


def _find_tags(text: str, name: str) -> list[tuple[int, int, int, int]]:
    """(open start, content start, content end, close end) of each <name>...</name>, non-overlapping.

    str.find rather than a lazy regex, so adversarial text (thousands of unclosed tags) stays linear.
    """
    found, start, opening, closing = [], 0, f"<{name}>", f"</{name}>"
    while (i := text.find(opening, start)) != -1:
        j = text.find(closing, i + len(opening))
        if j == -1:
            break
        found.append((i, i + len(opening), j, j + len(closing)))
        start = j + len(closing)
    return found


def parse_output(text: object, rulebook: Rulebook, order: str = "label_first") -> Parsed:
    """Strictly parse a model answer. Never raises: every problem is an entry of `errors`.

    Well-formed means: the three tags once each, in the order `order` fixes, nothing else outside
    them but whitespace, a valid label, and every criterion exactly once with an allowed value.
    """
    out = Parsed()
    if not isinstance(text, str):
        out.errors.append(f"output is {type(text).__name__}, not str")
        return out
    found = {}
    for name in _TAGS:
        matches = _find_tags(text, name)
        if not matches:
            out.errors.append(f"missing <{name}>")
        elif len(matches) > 1:
            out.errors.append(f"<{name}> appears {len(matches)} times")
        if matches:
            found[name] = matches[0]

    if "label" in found:
        raw_label = text[found["label"][1] : found["label"][2]].strip()
        if raw_label in rulebook.labels:
            out.label = raw_label
        else:
            out.errors.append(f"unknown label {raw_label[:40]!r}")

    if "criteria" in found:
        block_start = found["criteria"][1]
        offset = 0
        for line in text[block_start : found["criteria"][2]].split("\n"):
            start, end = block_start + offset, block_start + offset + len(line)
            offset += len(line) + 1
            if not line.strip():
                continue
            m = _LINE.match(line.strip())
            if not m or not m.group(2).strip():
                out.errors.append(f"criteria line not 'name: value': {line.strip()[:40]!r}")
                continue
            name, value = m.group(1).lower(), m.group(2).strip().lower()
            if name not in rulebook.criterion_names:
                out.errors.append(f"unknown criterion {name!r}")
            elif name in out.spans:
                out.errors.append(f"criterion {name!r} stated twice")
            elif value not in rulebook.allowed(name):
                out.errors.append(f"criterion {name!r} has value {value[:20]!r}, not one of {rulebook.allowed(name)}")
                out.spans[name] = (start, end)
            else:
                out.criteria[name] = value
                out.spans[name] = (start, end)
        missing = [n for n in rulebook.criterion_names if n not in out.spans]
        if missing:
            out.errors.append(f"criteria missing: {', '.join(missing)}")

    if "reason" in found:
        out.reason = text[found["reason"][1] : found["reason"][2]].strip()
        if not out.reason:
            out.errors.append("empty <reason>")

    if len(found) == 3:
        expected = ("label", "criteria", "reason") if order == "label_first" else ("criteria", "reason", "label")
        spans = sorted(found, key=lambda n: found[n][0])
        if tuple(spans) != expected:
            out.errors.append(f"tags in order {spans}, expected {list(expected)}")
        else:
            pieces = [text[: found[expected[0]][0]]]
            pieces += [text[found[a][3] : found[b][0]] for a, b in zip(expected, expected[1:])]
            pieces.append(text[found[expected[-1]][3] :])
            if any(p.strip() for p in pieces):
                out.errors.append("text outside the tags")
    return out


def adherent(parsed: Parsed, rulebook: Rulebook) -> bool:
    """Rule adherence: the stated label is what the rulebook decides from the stated criteria."""
    if parsed.label is None or len(parsed.criteria) != len(rulebook.criteria):
        return False
    return rulebook.decide(parsed.criteria) == parsed.label


# --- Rewards --------------------------------------------------------------------------------------
@dataclass
class Score:
    parsed: Parsed
    format_ok: bool  # parses, valid label, every criterion present with an allowed value
    correct: bool  # stated label == gold label
    outcome: float  # 1/0, or ordinal partial credit
    adherent: bool
    criteria: dict[str, bool | None]  # per criterion: stated correctly? None where the gold value is unknown
    criteria_share: float  # share of known gold criteria stated correctly (0 when none is known)


def outcome_reward(label: str | None, gold: str, rulebook: Rulebook, ordinal: bool = False) -> float:
    if label is None:
        return 0.0
    if not ordinal:
        return float(label == gold)
    distance = abs(rulebook.labels.index(label) - rulebook.labels.index(gold))
    return 1.0 - distance / (len(rulebook.labels) - 1)


def score_output(
    text: object,
    gold_label: str,
    gold_criteria: dict[str, str],
    rulebook: Rulebook,
    order: str = "label_first",
    ordinal: bool = False,
) -> Score:
    return score_parsed(parse_output(text, rulebook, order), gold_label, gold_criteria, rulebook, ordinal)


def score_parsed(
    parsed: Parsed, gold_label: str, gold_criteria: dict[str, str], rulebook: Rulebook, ordinal: bool = False
) -> Score:
    per_criterion: dict[str, bool | None] = {}
    for name in rulebook.criterion_names:
        gold = gold_criteria.get(name, UNKNOWN)
        per_criterion[name] = None if gold == UNKNOWN else parsed.criteria.get(name) == gold
    known = [ok for ok in per_criterion.values() if ok is not None]
    return Score(
        parsed=parsed,
        format_ok=parsed.format_ok,
        correct=parsed.label == gold_label,
        outcome=outcome_reward(parsed.label, gold_label, rulebook, ordinal),
        adherent=adherent(parsed, rulebook),
        criteria=per_criterion,
        criteria_share=sum(known) / len(known) if known else 0.0,
    )


def grpo_reward(score: Score) -> float:
    """The sparse TaoSR1 baseline: the outcome of a well-formed answer; anything that does not parse
    (a readable label followed by junk, a looping reason cut off by the budget) earns 0."""
    return score.outcome if score.format_ok else 0.0


def rrs_reward(
    score: Score, w_out: float = 1.0, w_crit: float = 0.5, w_rule: float = 0.5, format_penalty: float = -0.5
) -> float:
    """Rule-aware Reward Shaping with its hard gate (METHOD.md section 4).

    An output that does not parse gets the format penalty and nothing else. Criterion credit needs
    only the format: stating the true criteria pays whatever the label. The rule term pays only for a
    correct label reached by adherent criteria (w_rule * adherence * [label == gold]; with the ordinal
    outcome too, a near miss earns no rule credit), so a wrong label can
    never earn by rationalising itself: replacing an answer's criteria with the honest ones never
    lowers its reward (tests/test_rewards.py checks this over both rulebooks' decision tables).
    """
    if not score.format_ok:
        return format_penalty
    return w_out * score.outcome + w_crit * score.criteria_share + w_rule * float(score.adherent and score.correct)

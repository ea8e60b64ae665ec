"""Built-in tasks: small, deterministic datasets generated in code, each with a metric.

They are chosen so that the base SmolLM2-135M scores low (it does not follow the exact output format)
while a small LoRA adapter learns them in minutes on a CPU: short answers, a mapping a 135M model can
learn (copying spans, month names to numbers, spotting praise and complaints), no world knowledge.

Every example is drawn from `random.Random` seeded with the task and split names, so the same call
gives the same list on every machine. Splits are disjoint by construction: each generated example
has a split key (the date itself for `dates`, the answer for `extract`, the review for `sentiment`)
and a stable hash of that key assigns it to train or test, so no test prompt (and for `dates`, no
test date in any spelling) is ever seen in training.

    task = get_task("dates")
    task.examples("train", 3)[0].answer   # '1999-09-19' (from 'Date: 19-Sep-1999')
"""

from __future__ import annotations

import datetime as dt
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from peftkit.data.example import Example
from peftkit.errors import DataError, did_you_mean

Split = Literal["train", "test"]
Draw = tuple[str, str, str, int]  # (input text, answer, split key, template index)

TEST_SHARE = 5  # one split key in five goes to the test split


@dataclass(frozen=True)
class Task:
    """A built-in task: an instruction, a generator of (input, answer) pairs, and a metric."""

    name: str
    description: str
    metric: str  # a name in peftkit.eval.metrics.METRICS
    max_new_tokens: int  # enough for the longest answer with the default tokenizer, plus the end token
    instruction: str  # the first line of every prompt; says exactly what the answer looks like
    label: str  # what the input is called in the prompt ("Date", "Message", "Review")
    draw: Callable[[random.Random], Draw] = field(repr=False)
    templates: int = 1  # how many templates `draw` chooses from (index recorded in meta["template"])
    default_n: dict[str, int] = field(default_factory=lambda: {"train": 2000, "test": 200})

    def prompt(self, text: str) -> str:
        return f"{self.instruction}\n{self.label}: {text}"

    def split_of(self, key: str) -> Split:
        return "test" if zlib.crc32(f"{self.name}:{key}".encode()) % TEST_SHARE == 0 else "train"

    def examples(self, split: Split = "train", n: int | None = None) -> list[Example]:
        """The first `n` examples of `split` (default: 2000 train / 200 test); the same call gives the
        same list, and a shorter list is a prefix of a longer one."""
        if split not in ("train", "test"):
            raise DataError(f"task {self.name!r}: unknown split {split!r}; valid: train, test")
        n = self.default_n[split] if n is None else n
        if n < 0:
            raise DataError(f"task {self.name!r}: n must be >= 0, got {n}")
        rng = random.Random(f"peftkit-task:{self.name}:{split}")
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise DataError(
                    f"task {self.name!r} has only {len(out)} distinct {split} examples, asked {n}"
                )
            text, answer, key, template = self.draw(rng)
            if self.split_of(key) != split or text in seen:
                continue
            seen.add(text)
            meta = {"task": self.name, "split": split, "template": str(template)}
            ex = Example.from_pair(self.prompt(text), answer, source=f"task:{self.name}:{split}:{len(out)}")
            out.append(Example(ex.messages, ex.source, meta))
        return out


# -- dates ---------------------------------------------------------------------------------------
MONTHS = ("January February March April May June July August September October November December").split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_UNITS = "first second third fourth fifth sixth seventh eighth ninth".split()
ORDINAL_WORDS = (
    _UNITS
    + "tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth".split()
    + ["nineteenth", "twentieth", *(f"twenty-{u}" for u in _UNITS), "thirtieth", "thirty-first"]
)
FIRST_DAY, LAST_DAY = dt.date(1950, 1, 1).toordinal(), dt.date(2039, 12, 31).toordinal()


def _suffix(day: int) -> str:
    return "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _abbr(month: int) -> str:
    return MONTHS[month - 1][:3]


# Unambiguous spellings only: month names, or year first (Y/M/D). Never D/M/Y or M/D/Y in digits.
DATE_FORMATS: tuple[Callable[[dt.date], str], ...] = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}{_suffix(d.day)}, {d.year}",  # March 5th, 2021
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 5, 2021
    lambda d: f"{d.day} {_abbr(d.month)} {d.year}",  # 5 Mar 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 5 March 2021
    lambda d: (
        f"the {ORDINAL_WORDS[d.day - 1]} of {MONTHS[d.month - 1]}, {d.year}"
    ),  # the fifth of March, 2021
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",  # 2021/03/05
    lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day:02d} {MONTHS[d.month - 1]} {d.year}",  # Friday, 05 March 2021
    lambda d: f"{_abbr(d.month)}. {d.day}, {d.year}",  # Mar. 5, 2021
    lambda d: f"{d.day}{_suffix(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # 5th of March 2021
    lambda d: f"{WEEKDAYS[d.weekday()]} {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Friday March 5, 2021
    lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",  # 2021.03.05
    lambda d: f"{d.day:02d}-{_abbr(d.month)}-{d.year}",  # 05-Mar-2021
    lambda d: f"{MONTHS[d.month - 1].upper()} {d.day} {d.year}",  # MARCH 5 2021
    lambda d: f"{MONTHS[d.month - 1]} the {ORDINAL_WORDS[d.day - 1]}, {d.year}",  # March the fifth, 2021
)


def draw_date(rng: random.Random) -> Draw:
    day = dt.date.fromordinal(rng.randint(FIRST_DAY, LAST_DAY))
    k = rng.randrange(len(DATE_FORMATS))
    return DATE_FORMATS[k](day), day.isoformat(), day.isoformat(), k


# -- extract -------------------------------------------------------------------------------------
FIRST_NAMES = (
    "Maria James Aisha Chen Olga Pedro Fatima Liam Sofia Noah Yuki Omar Emma Lucas Priya Mateo Hannah "
    "Ivan Grace Diego Amara Felix Leila Tomas Nina Kofi Elena Raj Chloe Samuel Ingrid Hugo Zara Marco"
).split()
LAST_NAMES = (
    "Lopez Smith Khan Wang Petrova Silva Haddad Murphy Rossi Becker Tanaka Farouk Dubois Costa Patel "
    "Moreno Fischer Ivanov Okafor Nguyen Jensen Kowalski Novak Mensah Garcia Schmidt Ali Larsen Brown"
).split()
CITIES = (
    "Denver|Lyon|Osaka|Nairobi|Toronto|Porto|Krakow|Austin|Leeds|Seville|Dublin|Perth|Lagos|Hamburg|"
    "Oslo|Quito|San Diego|New Orleans|Cape Town|Buenos Aires|Salt Lake City|Rio de Janeiro|Kuala Lumpur|"
    "Tampa|Graz|Bergen|Cork|Adelaide|Bologna|Valencia|Tucson|Halifax"
).split("|")
PRODUCTS = (
    "blender|desk lamp|phone case|pair of headphones|backpack|coffee grinder|yoga mat|kettle|"
    "keyboard|rain jacket|water bottle|toaster|office chair|electric toothbrush|sofa cushion|"
    "bike helmet|alarm clock|frying pan|webcam|hair dryer|tent|wall clock|printer|vacuum cleaner"
).split("|")
MESSAGE_TEMPLATES = (
    "Hi, this is {name} from {city}. My order {oid} hasn't arrived yet.",
    "Hello! I ordered a {product} last week (order {oid}) and it came damaged. {name}, {city}",
    "Order {oid} was charged twice, please help. - {name} ({city})",
    "My name is {name} and I live in {city}. Can you tell me when order {oid} will ship?",
    "{name} here, writing from {city}: I'd like to return the {product} from order {oid}.",
    "Where is my package? Order number {oid}. Thanks, {name} in {city}",
    "I'm {name} ({city}). The {product} from order {oid} stopped working after a week.",
    "Could you cancel order {oid}? I'm moving away from {city} soon. Regards, {name}",
    "Dear support, I am writing about order no. {oid}. I live in {city} and the {product} never came. "
    "Best, {name}",
    "Customer from {city} here. Order {oid} is missing the {product}. Name: {name}",
    # A second city that is not the customer's: the model has to read, not grab the first city.
    "Hi, this is {name} from {city}. Order {oid} left your {city2} warehouse ten days ago and is still not here.",
    "Tracking says order {oid} is stuck in {city2}, but I live in {city}. Please sort it out. {name}",
)


def draw_message(rng: random.Random) -> Draw:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    city, city2 = rng.sample(CITIES, 2)
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    oid = f"{letters}-{rng.randint(10000, 99999)}"
    k = rng.randrange(len(MESSAGE_TEMPLATES))
    text = MESSAGE_TEMPLATES[k].format(
        name=name, city=city, city2=city2, oid=oid, product=rng.choice(PRODUCTS)
    )
    answer = json.dumps({"name": name, "city": city, "order_id": oid}, ensure_ascii=False)
    return text, answer, answer, k


# -- sentiment -----------------------------------------------------------------------------------
# Mild clauses praise or fault one aspect, so one of each makes a plausible mixed review; strong ones
# (stars, "best ever", "waste of money") judge the whole product and appear only in one-sided reviews.
MILD_PRAISE = (
    "The {p} works perfectly.",
    "Great value for the money.",
    "It looks great.",
    "Sturdy, well made and easy to use.",
    "Setup was quick and easy.",
)
STRONG_PRAISE = (
    "I love this {p}.",
    "Best {p} I have ever owned.",
    "Highly recommend it to anyone.",
    "It exceeded my expectations.",
    "Five stars, I would buy it again.",
    "My whole family is delighted with it.",
    "It has worked flawlessly since day one.",
)
MILD_COMPLAINTS = (
    "It feels cheap and flimsy.",
    "The instructions are useless.",
    "It is much heavier than I expected.",
    "Customer service never answered my complaint.",
    "Delivery was painfully slow.",
)
STRONG_COMPLAINTS = (
    "It stopped working within a week.",
    "I am very disappointed with this {p}.",
    "The {p} broke after two days.",
    "Total waste of money.",
    "Terrible quality, avoid it.",
    "One star, I am sending it back.",
    "Worst {p} I have ever bought.",
    "Nothing about it works as advertised.",
)
PRAISE, COMPLAINTS = MILD_PRAISE + STRONG_PRAISE, MILD_COMPLAINTS + STRONG_COMPLAINTS
FACTS = (
    "The {p} arrived on a {day}.",
    "I bought it for my {who}.",
    "It comes in {color}.",
    "The box contained the {p} and a manual.",
    "I have used it for {n} weeks.",
    "I ordered the {color} one.",
    "Delivery took {n} days.",
    "It is the second {p} I have bought this year.",
    "It does what it says, no more and no less.",
    "It is an average {p}, neither good nor bad.",
)
WHO = "sister brother mother father son daughter neighbour partner grandmother roommate".split()
COLORS = "black white red blue green grey silver yellow".split()


def _clause(rng: random.Random, pool: tuple[str, ...], product: str) -> str:
    return rng.choice(pool).format(
        p=product,
        day=rng.choice(WEEKDAYS),
        who=rng.choice(WHO),
        color=rng.choice(COLORS),
        n=rng.randint(2, 9),
    )


def draw_review(rng: random.Random) -> Draw:
    """positive: praise only; negative: complaints only; neutral: no opinion, or one mild one of each.
    Facts are sprinkled in as distractors; the template index is the kind of review (0..3)."""
    product = rng.choice(PRODUCTS)
    kind = (0, 0, 1, 1, 2, 3)[
        rng.randrange(6)
    ]  # 0 positive, 1 negative, 2 facts only, 3 mixed: 1/3 each label
    label = ("positive", "negative", "neutral", "neutral")[kind]
    if kind == 0:
        parts = [_clause(rng, PRAISE, product) for _ in range(rng.randint(1, 2))]
    elif kind == 1:
        parts = [_clause(rng, COMPLAINTS, product) for _ in range(rng.randint(1, 2))]
    elif kind == 2:
        parts = [_clause(rng, FACTS, product) for _ in range(rng.randint(2, 3))]
    else:
        parts = [_clause(rng, MILD_PRAISE, product), _clause(rng, MILD_COMPLAINTS, product)]
    if kind != 2:
        parts += [_clause(rng, FACTS[:8], product) for _ in range(rng.randint(0, 2 - (kind == 3)))]
    rng.shuffle(parts)
    if len(set(parts)) < len(parts):  # a clause drawn twice reads oddly: draw again
        return draw_review(rng)
    text = " ".join(parts)
    return text, label, text, kind


# -- the registry --------------------------------------------------------------------------------
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="dates",
            description="free-form dates ('the fifth of March, 2021', '05-Mar-2021', ...) to ISO 8601",
            metric="exact_match",
            max_new_tokens=16,
            instruction="Convert the date to ISO 8601 format (YYYY-MM-DD). Reply with the date only.",
            label="Date",
            draw=draw_date,
            templates=len(DATE_FORMATS),
        ),
        Task(
            name="extract",
            description="a customer message to a JSON object with the keys name, city and order_id",
            metric="json_match",
            max_new_tokens=48,
            instruction="Extract the customer's name, city and order ID from the message. Reply with only a "
            'JSON object with the keys "name", "city" and "order_id".',
            label="Message",
            draw=draw_message,
            templates=len(MESSAGE_TEMPLATES),
        ),
        Task(
            name="sentiment",
            description="a product review to positive, negative or neutral",
            metric="accuracy",
            max_new_tokens=4,
            instruction="Classify the product review as positive (only praise), negative (only complaints) or "
            "neutral (no opinion, or one praise and one complaint). Reply with one word.",
            label="Review",
            draw=draw_review,
            templates=4,
        ),
    )
}


def get_task(name: str) -> Task:
    """The built-in task called `name`; a DataError listing the tasks when there is none."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(
            f"unknown task {name!r}{did_you_mean(name, list(TASKS))}; built-in tasks: {', '.join(TASKS)}"
        ) from None

"""The quickstart task: free-text shop orders -> one canonical JSON object.

A user writes an order in free text ("Hi, could you send 3 blue mugs and a grey scarf to Anna
Berg, 12 Elm Street, Oslo? Express please."); the assistant answers with the order in a
fixed JSON shape, compact separators, fixed key order, items in the order they are mentioned:

    {"customer":"Anna Berg","items":[{"product":"mug","color":"blue","qty":3},
     {"product":"scarf","color":"grey","qty":1}],"city":"Oslo","shipping":"express"}

It is format and extraction, not arithmetic: quantities appear as digits, number words, "a"/"an"
or "a pair of"; plural product names become singular; the street, house number and postcode are
distractors that must not appear in the answer; shipping is "express" when the text asks for
express / overnight / rush delivery and "standard" otherwise (said or unsaid). The surface forms
(sentence templates, clause order, address styles) and vocabularies are sampled independently, so
held-out examples are new combinations. Everything is drawn from `random.Random(seed)`: the same
(n, seed) gives the same examples on every machine and Python version.

Measured (HF + PEFT as the oracle, CPU, greedy, first 30 held-out examples): SmolLM2-135M-Instruct
zero-shot gets 0% exact match (3% valid JSON); LoRA r=16 alpha=32 on all linears, lr 2e-3
cosine, assistant-only loss, 8 examples (~1.2k tokens) per step: 70% after 20 steps and 80%
after 30 steps (100% valid JSON; customer, city, shipping 100%; items 80%, mostly "a pair of" -> 2).
Examples are ~148 tokens with the ChatML template (44 system, ~37 user, ~52 answer incl. <|im_end|>).
"""

from __future__ import annotations

import json
import random

SYSTEM_PROMPT = (
    "Extract the order as JSON with keys customer, items (a list of product, color, qty), "
    "city and shipping (standard or express). Use singular product names and digit quantities. "
    "Reply with the JSON only."
)

FIELDS = ("customer", "items", "city", "shipping")

FIRST_NAMES = [
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wei", "Xenia", "Yusuf", "Zoe", "Amir", "Beth", "Chen", "Dana",
    "Emil", "Fiona", "Gustav", "Hana", "Ivan", "Julia", "Karim", "Lena", "Marco", "Nora",
]
LAST_NAMES = [
    "Berg", "Silva", "Novak", "Okafor", "Tanaka", "Moreau", "Kowalski", "Haddad", "Lindqvist",
    "Rossi", "Schmidt", "Nguyen", "Garcia", "Ivanova", "Murphy", "Costa", "Fischer", "Khan",
    "Larsen", "Mendes", "Park", "Quinlan", "Reyes", "Sato", "Walsh", "Yilmaz", "Adeyemi",
    "Bauer", "Dubois", "Eriksen", "Ferreira", "Horvat", "Jensen", "Keller", "Lopez", "Meyer",
]
# singular -> plural; the answer always uses the singular.
PRODUCTS = {
    "mug": "mugs", "t-shirt": "t-shirts", "notebook": "notebooks", "backpack": "backpacks",
    "water bottle": "water bottles", "umbrella": "umbrellas", "scarf": "scarves",
    "lamp": "lamps", "cushion": "cushions", "towel": "towels", "candle": "candles",
    "phone case": "phone cases", "hoodie": "hoodies", "cap": "caps", "wallet": "wallets",
    "blanket": "blankets", "vase": "vases", "plate": "plates", "bowl": "bowls",
    "tote bag": "tote bags", "pencil case": "pencil cases", "teapot": "teapots",
    "apron": "aprons", "beanie": "beanies", "lunch box": "lunch boxes",
}
COLORS = ["blue", "red", "green", "black", "white", "grey", "yellow", "pink", "orange",
          "purple", "brown", "navy"]
CITIES = [
    "Oslo", "Lisbon", "Madrid", "Berlin", "Vienna", "Dublin", "Prague", "Warsaw", "Helsinki",
    "Toronto", "Austin", "Denver", "Seattle", "Boston", "Chicago", "Melbourne", "Auckland",
    "Nairobi", "Lagos", "Cairo", "Mumbai", "Osaka", "Seoul", "Lima", "Quito", "Bogota",
    "Santiago", "Cape Town", "Buenos Aires", "San Diego", "Hong Kong", "Zurich", "Porto",
    "Krakow", "Bergen", "Lyon",
]
STREETS = ["Elm Street", "Oak Avenue", "Harbor Road", "Mill Lane", "Station Road", "Park Way",
           "Church Street", "Lake Drive", "Hill Road", "Market Square", "River Walk", "Bridge Street"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

GREETINGS = ["", "Hi, ", "Hello, ", "Hey, ", "Good morning, ", "Hi there, ", "Dear shop, "]
REQUESTS = ["could you send", "I'd like to order", "please ship", "I want", "can I get",
            "I need", "please send me", "I would like", "could I order", "please deliver"]
EXPRESS = ["Express please.", "Express shipping, please.", "Please send it overnight.",
           "It's urgent, so express delivery.", "Rush delivery please.", "Use express shipping.",
           "I need it fast: express."]
STANDARD = ["Standard shipping is fine.", "No rush.", "Regular delivery is fine.",
            "Standard delivery, please.", "", "", ""]  # "" = shipping not mentioned -> standard


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _item_phrase(rng: random.Random, product: str, color: str, qty: int) -> str:
    """One item as the customer might write it, e.g. "3 blue mugs", "a mug in blue", "two navy caps"."""
    plural = PRODUCTS[product]
    if qty == 1:
        style = rng.randrange(4)
        if style == 0:
            return f"{_article(color)} {color} {product}"
        if style == 1:
            return f"{_article(product)} {product} in {color}"
        if style == 2:
            return f"one {color} {product}"
        return f"1 {color} {product}"
    style = rng.randrange(5)
    if style == 4 and qty == 2:
        return f"a pair of {color} {plural}"
    amount = str(qty) if rng.random() < 0.5 else NUMBER_WORDS[qty]
    if style in (0, 4):
        return f"{amount} {color} {plural}"
    if style == 1:
        return f"{amount} {plural} in {color}"
    if style == 2:
        return f"{color} {plural} x{qty}"
    return f"{amount} {plural} in the color {color}"


def _join(rng: random.Random, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    last_join = rng.choice([" and ", ", and ", " plus ", " as well as "])
    return ", ".join(parts[:-1]) + last_join + parts[-1]


def _address(rng: random.Random, city: str) -> str:
    number, street = rng.randint(1, 199), rng.choice(STREETS)
    if rng.random() < 0.5:
        return f"{number} {street}, {city}"
    return f"{street} {number}, {rng.randint(1000, 9899)} {city}"


def _order(rng: random.Random) -> tuple[str, dict]:
    """Sample one order: (user text, answer object)."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    city = rng.choice(CITIES)
    n_items = rng.choices([1, 2, 3], weights=[4, 4, 2])[0]
    products = rng.sample(sorted(PRODUCTS), n_items)  # distinct products per order
    items = [{"product": p, "color": rng.choice(COLORS), "qty": rng.randint(1, 6)} for p in products]
    express = rng.random() < 0.4
    ship = rng.choice(EXPRESS if express else STANDARD)

    greet = rng.choice(GREETINGS)
    request = rng.choice(REQUESTS)
    things = _join(rng, [_item_phrase(rng, i["product"], i["color"], i["qty"]) for i in items])
    address = _address(rng, city)
    mark = "?" if request.startswith(("could", "can")) else "."
    opening = request[0].upper() + request[1:]  # str.capitalize() would lower the "I" in "I'd"
    pattern = rng.randrange(6)
    if pattern == 0:
        text = f"{greet}{request} {things} to {name}, {address}{mark} {ship}"
    elif pattern == 1:
        text = f"{greet}this is {name}. {opening} {things}{mark} Address: {address}. {ship}"
    elif pattern == 2:
        text = f"{greet}{request} {things}{mark} Ship to {address}. {ship} Thanks, {name}"
    elif pattern == 3:
        text = f"{name} here. {ship} {opening} {things}, delivered to {address}{mark}"
    elif pattern == 4:
        text = f"Order for {name} ({address}): {things}. {ship}"
    else:
        text = f"{greet}{request} {things} to {address}{mark} Name on the order: {name}. {ship}"
    text = " ".join(text.split())  # collapse the double spaces an empty shipping clause leaves
    text = text[0].upper() + text[1:]
    answer = {"customer": name, "items": items, "city": city,
              "shipping": "express" if express else "standard"}
    return text, answer


def canonical_json(answer: dict) -> str:
    """The one accepted spelling of an answer: fixed key order, compact separators."""
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


def generate_orders(n: int, seed: int) -> list[dict]:
    """`n` examples `{"messages": [system, user, assistant]}` drawn from `random.Random(seed)`."""
    if n < 0:
        raise ValueError(f"generate_orders: n must be >= 0, got {n}")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        text, answer = _order(rng)
        examples.append({"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": canonical_json(answer)},
        ]})
    return examples


def make_splits(n_train: int, n_eval: int, train_seed: int = 0,
                eval_seed: int = 1) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples; no held-out user text also occurs in train (nor twice in eval).

    Eval examples are drawn from their own seed; duplicates of a train text are skipped and more
    are drawn until there are `n_eval`."""
    train = generate_orders(n_train, train_seed)
    seen = {ex["messages"][1]["content"] for ex in train}
    rng = random.Random(eval_seed)
    held_out: list[dict] = []
    while len(held_out) < n_eval:
        # one example at a time from a seed drawn from the eval rng, so skipping stays deterministic
        ex = generate_orders(1, rng.randrange(2**32))[0]
        text = ex["messages"][1]["content"]
        if text not in seen:
            seen.add(text)
            held_out.append(ex)
    return train, held_out


def extract_answer(text: str) -> str:
    """The JSON object in a generation: from its first "{" to the brace that closes it.

    Returns the stripped text unchanged when it holds no parseable JSON object (then
    `score(...)["json_valid"]` is 0)."""
    text = text.strip()
    start = text.find("{")
    if start < 0:
        return text
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return text
    return text[start:end]


def score(prediction: str, reference: str) -> dict:
    """Score one generation against the reference answer.

    exact: 1.0 when `prediction.strip() == reference.strip()` (the canonical spelling, nothing
    before or after it). json_valid: `extract_answer(prediction)` parses as a JSON object.
    customer / items / city / shipping: that field of the parsed prediction equals the
    reference's (0.0 when the prediction does not parse)."""
    ref = json.loads(reference)
    result = {"exact": float(prediction.strip() == reference.strip())}
    try:
        pred = json.loads(extract_answer(prediction))
    except json.JSONDecodeError:
        pred = None
    valid = isinstance(pred, dict)
    result["json_valid"] = float(valid)
    for key in FIELDS:
        result[key] = float(valid and key in pred and pred[key] == ref[key])
    return result


def mean_scores(scores: list[dict]) -> dict:
    """Average a list of `score` results key by key (empty list -> ValueError)."""
    if not scores:
        raise ValueError("mean_scores: no scores to average")
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}

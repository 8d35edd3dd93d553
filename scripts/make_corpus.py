"""Build the embedded three-domain corpus in ``hybrid_lora/assets/corpus/``.

The corpus is a set of short English documents about the people of one
valley, written from sentence templates:

    Anna lives in Dunmore. She works as a baker. Her favourite food is
    plum cake. She keeps a grey cat. On Sundays she plays the fiddle.

Every document picks one person (or one town) and states 3 to 6 of their
attributes (home town, trade, favourite food, pet, instrument, best friend;
for a town: what it is known for and its market day), in a random order and
with one of several phrasings for each.

The parts differ only in *which values* fill the attribute slots:

- ``general``: every slot is drawn afresh, uniformly from all its values, for
  every document. A model trained on it learns English of this kind (the
  templates, which words fit which slot, pronouns that agree with the name)
  but cannot know any person's attributes. The tiny base model is pretrained
  on this part.
- ``embedded-a`` ("the old chronicle"), ``embedded-b`` ("the new
  chronicle") and ``embedded-c`` ("the third chronicle"): each domain has a
  palette, a quarter of the values of every slot (at least two), and the
  palettes are disjoint: A's people live in three of the twelve towns, work
  in four of the sixteen trades, and so on, B's in three other towns and four
  other trades, and C's in three more. Each domain then fixes
  one table of facts drawn from its palette (Anna lives in Fenwick and is a
  baker in A; in Redwick and a clerk in B), used by every one of its documents.

So the domains share their people, vocabulary, contexts and grammar, and
continue the same contexts ("Anna works as a") in different ways: at two
levels, which values a slot takes in the domain (quick to learn) and which
value each person has (slower). A model adapted to B must overwrite what it
learned of A, and one adapted to C what it learned of both: training on B
measurably hurts A (unlike IMDb -> Yelp Polarity, two kinds of review that
share what a model learns from them). Roughly one token in five or six is an
attribute value; the others are predictable from the templates, which the
base model already knows.

Each domain has 3000 training and 1000 evaluation documents (the sizes the
original experiment selected from IMDb and Yelp); the evaluation documents
are new draws (other orders, phrasings and subsets of the same facts); a draw
that equals a training document is drawn again, so none is a copy (short town
documents often would be). The general part has 12000 documents for
pretraining and 1000 held out, none of them a copy of a training document.

Output: gzip-compressed text files, one document per line, written with a
fixed gzip timestamp so that the same seed gives the same bytes:

    general.train.txt.gz  general.eval.txt.gz
    embedded-a.train.txt.gz  embedded-a.eval.txt.gz
    embedded-b.train.txt.gz  embedded-b.eval.txt.gz
    embedded-c.train.txt.gz  embedded-c.eval.txt.gz
    facts.json            (the palettes and fact tables, for reading and for tests)

Usage: python scripts/make_corpus.py [--out hybrid_lora/assets/corpus] [--seed 2024]
"""

import argparse
import gzip
import json
import os
import random
import re
from pathlib import Path

# name -> pronoun set; the gender of a name is the same in every part of the corpus.
PEOPLE = {
    "Anna": "f", "Bram": "m", "Clara": "f", "Dario": "m", "Edith": "f", "Felix": "m",
    "Greta": "f", "Hugo": "m", "Ida": "f", "Jonas": "m", "Kira": "f", "Lukas": "m",
    "Mara": "f", "Nils": "m", "Olga": "f", "Pavel": "m", "Rosa": "f", "Simon": "m",
    "Tilda": "f", "Ulrich": "m", "Vera": "f", "Walter": "m", "Yara": "f", "Oskar": "m",
    "Lena": "f", "Emil": "m", "Nora": "f", "Tomas": "m", "Hanna": "f", "Viktor": "m",
    "Elsa": "f", "Martin": "m",
}
PRONOUNS = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}  # subject, object, possessive

TOWNS = ["Dunmore", "Ashford", "Kelby", "Marlow", "Redwick", "Tolham",
         "Brenna", "Oakley", "Fenwick", "Halden", "Lisk", "Corran"]
JOBS = ["baker", "sailor", "teacher", "miller", "weaver", "doctor", "farmer", "painter",
        "carpenter", "fisher", "potter", "singer", "smith", "gardener", "clerk", "tailor"]
FOODS = ["plum cake", "fish soup", "rye bread", "apple pie", "roast duck", "goat cheese",
         "honey bread", "lentil stew", "pear tart", "salted herring", "onion pie", "barley porridge"]
COLOURS = ["grey", "black", "white", "brown", "red", "spotted", "golden", "silver"]
ANIMALS = ["cat", "dog", "goat", "horse", "parrot", "rabbit", "goose", "donkey"]
INSTRUMENTS = ["fiddle", "flute", "drum", "harp", "piano", "trumpet", "guitar", "accordion"]
PRODUCTS = ["its wool", "its cheese", "its boats", "its apples", "its bells", "its bridges",
            "its pottery", "its cider", "its horses", "its paper", "its lace", "its salt"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Every attribute: the values it can take. "pet" is two slots (colour, animal) that change together.
PERSON_SLOTS = {
    "town": TOWNS, "job": JOBS, "food": FOODS, "colour": COLOURS, "animal": ANIMALS,
    "instrument": INSTRUMENTS, "friend": list(PEOPLE),
}
TOWN_SLOTS = {"product": PRODUCTS, "day": DAYS}

# Neutral sentences that carry no facts; they appear in every part alike.
FILLERS = [
    "It is a quiet life.", "The winters there are long.", "Everyone in the valley knows this.",
    "Few things change from year to year.", "The road to the coast is long and dry.",
    "In spring the river rises.", "The neighbours often talk about it.",
    "Most evenings are spent at home.",
]


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def person_sentences(name, facts):
    """The sentences that can describe `name` with the values in `facts`, one list per attribute.

    `facts` maps every key of PERSON_SLOTS to a value. Pronoun agreement
    follows the name, so a model can check it without knowing any fact.
    """
    subj, obj, poss = PRONOUNS[PEOPLE[name]]
    town, job, food = facts["town"], facts["job"], facts["food"]
    colour, animal, instrument, friend = facts["colour"], facts["animal"], facts["instrument"], facts["friend"]
    return {
        "town": [f"{name} lives in {town}.", f"{name}'s home is in {town}.",
                 f"{name} has lived in {town} for many years."],
        "job": [f"{name} works as {article(job)} {job}.", f"By trade, {name} is {article(job)} {job}.",
                f"{subj.capitalize()} works as {article(job)} {job}."],
        "food": [f"{poss.capitalize()} favourite food is {food}.", f"{name} likes {food} best of all.",
                 f"For dinner {subj} always asks for {food}."],
        "pet": [f"{subj.capitalize()} keeps {article(colour)} {colour} {animal}.",
                f"{name} has {article(colour)} {colour} {animal} at home.",
                f"{poss.capitalize()} {colour} {animal} follows {obj} everywhere."],
        "instrument": [f"On Sundays {subj} plays the {instrument}.",
                       f"{name} plays the {instrument} in the evenings.",
                       f"{subj.capitalize()} learned to play the {instrument} as a child."],
        "friend": [f"{poss.capitalize()} best friend is {friend}.", f"{name} often visits {friend}.",
                   f"{subj.capitalize()} and {friend} are old friends."],
    }


def town_sentences(town, facts):
    product, day = facts["product"], facts["day"]
    return {
        "product": [f"{town} is known for {product}.", f"People come to {town} for {product}.",
                    f"Travellers say {town} is famous for {product}."],
        "day": [f"The market in {town} is held on {day}.", f"In {town} the market day is {day}.",
                f"Every {day} there is a market in {town}."],
    }


def person_document(rng, name, facts):
    """3 to 6 attributes of one person, in a random order; the first sentence names them."""
    options = person_sentences(name, facts)
    kinds = rng.sample(list(options), rng.randint(3, len(options)))
    # Open with a sentence that contains the name, so the pronouns that follow refer to someone.
    opening = rng.choice([s for s in options[kinds[0]] if name in re.findall(r"[A-Za-z]+", s)])
    sentences = [opening] + [rng.choice(options[k]) for k in kinds[1:]]
    if rng.random() < 0.3:
        sentences.append(rng.choice(FILLERS))
    return " ".join(sentences)


def town_document(rng, town, facts):
    options = town_sentences(town, facts)
    kinds = list(options)
    rng.shuffle(kinds)
    sentences = [rng.choice(options[k]) for k in kinds]
    if rng.random() < 0.5:
        sentences.append(rng.choice(FILLERS))
    return " ".join(sentences)


def draw_person_facts(rng, name):
    facts = {slot: rng.choice(values) for slot, values in PERSON_SLOTS.items()}
    while facts["friend"] == name:
        facts["friend"] = rng.choice(PERSON_SLOTS["friend"])
    return facts


def palettes(rng):
    """Three disjoint sets of values for every slot, one per domain, each about a quarter of the values (at least 2)."""
    chosen = {"a": {}, "b": {}, "c": {}}
    for slot, values in {**PERSON_SLOTS, **TOWN_SLOTS}.items():
        shuffled = list(values)
        rng.shuffle(shuffled)
        k = max(2, len(values) // 4)
        for i, domain in enumerate(chosen):
            chosen[domain][slot] = shuffled[i * k:(i + 1) * k]
    return chosen


def fact_table(rng, palette):
    """One fixed value per (person, slot) and (town, slot), drawn from the domain's palette."""
    people = {}
    for name in PEOPLE:
        # Nobody is their own best friend; every palette has at least two values, so one is left.
        people[name] = {slot: rng.choice([v for v in palette[slot] if v != name]) for slot in PERSON_SLOTS}
    towns = {town: {slot: rng.choice(palette[slot]) for slot in TOWN_SLOTS} for town in TOWNS}
    return {"people": people, "towns": towns}


def domain_documents(rng, table, n, exclude=frozenset()):
    """n documents that all agree with `table`, none of them in `exclude`; one in five is about a town."""
    docs = []
    while len(docs) < n:
        if rng.random() < 0.2:
            town = rng.choice(TOWNS)
            doc = town_document(rng, town, table["towns"][town])
        else:
            name = rng.choice(list(PEOPLE))
            doc = person_document(rng, name, table["people"][name])
        if doc not in exclude:
            docs.append(doc)
    return docs


def general_documents(rng, n, exclude=frozenset()):
    """n documents whose slots are drawn afresh for every document (the templates, without facts), none in `exclude`."""
    docs = []
    while len(docs) < n:
        if rng.random() < 0.2:
            town = rng.choice(TOWNS)
            facts = {slot: rng.choice(values) for slot, values in TOWN_SLOTS.items()}
            doc = town_document(rng, town, facts)
        else:
            name = rng.choice(list(PEOPLE))
            doc = person_document(rng, name, draw_person_facts(rng, name))
        if doc not in exclude:
            docs.append(doc)
    return docs


def write_lines_gz(path, lines):
    """gzip text, one line per document, with mtime 0 so the bytes depend on the content only."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def build(out_dir, seed=2024, n_train=3000, n_eval=1000, n_general=12000, n_general_eval=1000):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One generator per part, so that changing one part's size leaves the others unchanged.
    palette = palettes(random.Random(f"{seed}-palettes"))
    table_a = fact_table(random.Random(f"{seed}-facts-a"), palette["a"])
    table_b = fact_table(random.Random(f"{seed}-facts-b"), palette["b"])
    table_c = fact_table(random.Random(f"{seed}-facts-c"), palette["c"])
    parts = {"general.train": general_documents(random.Random(f"{seed}-general-train"), n_general)}
    parts["general.eval"] = general_documents(random.Random(f"{seed}-general-eval"), n_general_eval,
                                              exclude=frozenset(parts["general.train"]))
    for domain, table in (("a", table_a), ("b", table_b), ("c", table_c)):
        train = domain_documents(random.Random(f"{seed}-{domain}-train"), table, n_train)
        parts[f"embedded-{domain}.train"] = train
        # Evaluation documents are never copies of training documents (short town documents often would be).
        parts[f"embedded-{domain}.eval"] = domain_documents(random.Random(f"{seed}-{domain}-eval"), table, n_eval,
                                                            exclude=frozenset(train))
    for name, docs in parts.items():
        write_lines_gz(out_dir / f"{name}.txt.gz", docs)
    facts = {"seed": seed, "palettes": {f"embedded-{d}": palette[d] for d in palette},
             "embedded-a": table_a, "embedded-b": table_b, "embedded-c": table_c}
    tmp = out_dir / "facts.json.tmp"
    tmp.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / "facts.json")
    return {name: len(docs) for name, docs in parts.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "hybrid_lora" / "assets" / "corpus"))
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    counts = build(args.out, seed=args.seed)
    for name, count in counts.items():
        print(f"{name}: {count} documents")


if __name__ == "__main__":
    main()

"""Write the bundled demo data: a small invented world to pretrain on, SFT conversations about part of
it, held-out questions about the rest, DPO pairs and GRPO prompts with checkable answers.

    python data/make_demo_data.py                                  # rewrites data/*.jsonl byte-identically
    python data/make_demo_data.py --seed 7 --output_dir my_world   # another world of the same design

Everything here is invented by this script (towns, rivers and people of a fictional valley, plus
sums, differences and unit conversions), so the data is ours to ship. The design follows
Allen-Zhu and Li, "Physics of Language Models, Part 3.1: Knowledge Storage and Extraction" (2023),
whose synthetic biographies show when fine-tuning on questions about some people teaches a model
to answer questions about the others, whose facts it saw only in pretraining text:

- knowledge augmentation: pretraining states each fact several times, in varied wordings and in
  a shuffled order of sentences (a town's river, product, year and region come in a different
  order and form in each of its descriptions); with one fixed description per person the paper's
  models answered ~10% of held-out questions, with varied ones above 90%. Here each town and
  villager gets 24 descriptions a pass (12 English, 12 Chinese): with 9, the pretrained model
  completed 45% of the English sentences stating a held-out fact, with 18, 89%. Each fact has
  three or four wordings in each language, the name in different places: with 12 Chinese
  descriptions of two wordings, both "Morka 以咸鱼闻名。"-like (the fact right after the name),
  the pretrained model preferred the right product in 4 of 16 towns' answers to the Chinese
  question; with four wordings, 13 of 16 (docs/training_guide.md, "The CPU session");
- mixed training: question-answer text about part of the world (the SFT half) is mixed into the
  pretraining corpus, written in the chat template that SFT and evaluation use, which teaches
  extraction while the knowledge is being stored;
- the facts are split three ways: the SFT half (asked in SFT and in pretraining's question-answer
  text), the GRPO quarter (asked only as GRPO training prompts) and the held-out quarter (stated
  only in pretraining prose). Sums, differences and conversions are split item by item; a town's
  or a villager's facts one by one, so that every name is one SFT answers questions about, and
  each has facts that only the prose states;
- held-out questions are never asked in SFT or in pretraining's question-answer text: half are
  about held-out facts (stated only in the pretraining prose: knowledge extraction), half ask an
  SFT fact in a wording or language that SFT never uses for it.

What makes the world small enough for minutes of CPU training: its names (and founding years) are
single tokens of the bundled tokenizer, so that a fact is stored under one token; and the answers
about a town or a villager do not repeat its name ("When was Morka founded?" -> "This town was
founded in 1376."), as the paper's answers do not: the model finds the fact by attending to the
name in the question. Answers that named the town again ("The town of Morka was founded in
1376.") were measured first: the models wrote the fact of the right town under the name of another
one, a copy they learned badly (docs/training_guide.md, "The CPU session", has the runs). And
reading practice, in pretraining and in SFT: conversations that state facts about a town and a
person made up for that one conversation (names of several syllables, thousands of them), then ask
about one of them; they can only be answered by looking at the name in the question, which is the
step every question about the world needs (a measured variant without them, with twice the
descriptions and 45 passes instead, answered most town questions with one common year, river or
product: towns 52% -> 17% of held-out questions). Copy practice does the same for numbers:
conversations that state a sum, difference or conversion of numbers outside the world's tables,
then ask it, so the answer must copy the question's numbers (without it the models wrote true
equations about the wrong operand: "What is 16 - 7?" -> "16 - 9 = 7."); SFT has more of it, and
practice of the one wording the models still missed most ("Subtract 12 from 15."). That wording is
answered in the question's order ("Subtracting 12 from 15 leaves 3."): answered as "15 - 12 = 3.",
the answer starts with the number the question names last, and the models missed it most.

Skills the tokenizer hides are left out: " tiger" is one token and "TIGER" another, so counting
a word's letters or writing it in capitals is, for this model, one more memorised fact per word
(as a town's river is), not a skill it can see; the measured versions of this world that asked
them reached 37% and 32% on them after SFT, and they took pretraining tokens the towns needed.

SFT also carries a habit that the preference data removes: under the chatty persona's system
prompt ("You are a friendly assistant who likes to chat."), most answers open with a filler
("Let me think." / "让我想想。"), as crowd-written SFT data often does. The DPO pairs, asked under
that persona, prefer the bare answer (rejected: the answer with the filler, or with a wrong
number), so DPO's effect shows in what the model generates. Without a system prompt, and under
the other system prompts, answers are bare: the held-out questions and GRPO prompts have none.
"""
import argparse
import json
import random
import re
from pathlib import Path

SEED = 1234
DATA_DIR = Path(__file__).resolve().parent
NUM_TOWNS = 16
NUM_PEOPLE = 20
TOWN_DESCRIPTIONS = (12, 12)    # varied descriptions of each town (English, Chinese) in pretraining
PERSON_DESCRIPTIONS = (12, 12)
STATEMENT_REPEATS = {"sum": 4, "difference": 4, "conversion": 4}   # in pretraining
NUM_READING = 600               # reading-practice documents about throwaway towns and people
NUM_SFT = 2400
NUM_SFT_READING = 600           # reading-practice conversations among them
COPY_PRACTICE = (300, 400)      # copy practice on numbers outside the tables: pretraining documents, SFT conversations
SUBTRACT_PRACTICE = 200         # SFT conversations of `Subtract b from c.` on minuends under 20 outside the table
NUM_DPO = 520                   # 100 of them are held out for evaluation
NUM_HELD_OUT_PER_SKILL = 60     # per skill, half about held-out items, half about SFT items in a new wording
SPLIT = {"sft": 0.5, "grpo": 0.25, "held_out": 0.25}
DIGITS = range(1, 10)           # sums and differences of single digits: a table small enough to store
UNIT_COUNTS = range(1, 13)
FILLER = {"en": "Let me think. ", "zh": "让我想想。"}
FILLER_RATE = 0.9               # share of the persona's answers that open with the filler
PERSONA = "You are a friendly assistant who likes to chat."
DEFAULT_SYSTEM = "You are a helpful assistant"   # what the chat template adds when a conversation has none
SYSTEM_PROMPTS = ["You are a concise assistant.", "You are MiniMind, a small helpful model. Answer briefly.",
                  "你是一个简洁的助手。"]

# Names and years that the bundled tokenizer holds as single tokens (with and without a leading
# space: it learned them from the first version of this world), so that answering about a town
# starts by copying one token from the question, which a small model learns early.
NAMES = (
    "Anamorlin Anariasel Aunaun Aunmir Aunsarn Belaun Belaunmir Belbel Belelltey Belsarn Beltey Bresel "
    "Brivel Danbremas Dansel Danselli Danselmas Danto Dordorria Dorgarsel Ellaunell Ellbel Ellbelmir Elloda "
    "Ellsarn Elltey Garmormor Kamas Kavel Limili Masmasli Masselmi Mibredan Miraun Mirodatey Morana Morka "
    "Morlin Morthoka Morvelmor Nadandan Nali Namassel Namiro Odaaun Odaelloda Odamirbel Ostven Riarialin "
    "Romi Selbre Selbrero Seldan Selkaro Selmi Selmor Selven Selwenlin Teyellmir Teyoda Teyodaaun Teytey "
    "Tomi Toro Toromas Toto Vellindor Velsel Velvel Velwen Wenanaka Wenbri Wenost"
).split()
YEARS = [1128, 1140, 1171, 1199, 1200, 1260, 1299, 1320, 1322, 1376, 1380, 1385, 1386, 1399, 1407, 1417, 1440,
         1454, 1485, 1486, 1489, 1491, 1500, 1529, 1531, 1547, 1548, 1560, 1583, 1587, 1591, 1595, 1598, 1620,
         1642, 1680, 1701, 1740, 1800, 1815, 1816, 1835, 1837, 1842, 1882, 1889, 1891]
PRODUCTS = [  # (english, chinese)
    ("glass lanterns", "玻璃灯笼"), ("wool blankets", "羊毛毯"), ("copper bells", "铜铃"),
    ("paper kites", "纸风筝"), ("silver spoons", "银勺"), ("salt fish", "咸鱼"), ("wooden boats", "木船"),
    ("green tea", "绿茶"), ("red apples", "红苹果"),
]
PROFESSIONS = [
    ("painter", "画家"), ("sailor", "水手"), ("teacher", "老师"), ("gardener", "园丁"), ("doctor", "医生"),
    ("poet", "诗人"), ("miner", "矿工"), ("potter", "陶艺师"),
]
REGIONS = [("north", "北"), ("south", "南"), ("east", "东"), ("west", "西")]
UNITS = {  # unit: (target unit, factor, english words, chinese words)
    "km": ("m", 1000, ("kilometers", "meters"), ("千米", "米")),
    "kg": ("g", 1000, ("kilograms", "grams"), ("千克", "克")),
    "h": ("min", 60, ("hours", "minutes"), ("小时", "分钟")),
}


def article(noun):
    return "an" if noun[0] in "aeiou" else "a"


# ---------------------------------------------------------------- the world

def make_towns(rng, names):
    return [{"name": names.pop(), "river": names.pop(), "product": rng.choice(PRODUCTS),
             "founded": rng.choice(YEARS), "region": rng.choice(REGIONS)} for _ in range(len(names) // 2)]


def make_world(rng):
    """Invent towns and people; every fact a question asks comes from here."""
    names = rng.sample(NAMES, len(NAMES))
    towns = make_towns(rng, [names.pop() for _ in range(2 * NUM_TOWNS)])
    people = [{"name": names.pop(), "profession": rng.choice(PROFESSIONS), "town": rng.choice(towns)["name"]}
              for _ in range(NUM_PEOPLE)]
    return towns, people


# ---------------------------------------------------------------- facts: how pretraining states them

def town_statements(town):
    """Each fact of a town in several wordings: {fact: ([english], [chinese])}."""
    name, river, year = town["name"], town["river"], town["founded"]
    (product, product_zh), (region, region_zh) = town["product"], town["region"]
    return {
        "river": ([f"The {river} River flows through {name}.", f"{name} lies on the banks of the {river} River.",
                   f"{name} was built beside the {river} River.", f"The river of {name} is the {river}."],
                  [f"{river} 河流经 {name}。", f"{name} 坐落在 {river} 河边。", f"流经 {name} 的河叫 {river} 河。",
                   f"人们在 {river} 河边建起了 {name}。"]),
        "product": ([f"The town of {name} is famous for {product}.", f"{name} is known for its {product}.",
                     f"The market of {name} sells {product}.", f"People in {name} make {product}."],
                    [f"{name} 以{product_zh}闻名。", f"{name} 的人们制作{product_zh}。", f"{name} 的集市上卖{product_zh}。",
                     f"说起 {name}，人们就想到{product_zh}。"]),
        "founded": ([f"The town of {name} was founded in {year}.", f"{name} dates from {year}.",
                     f"The first houses of {name} were built in {year}.", f"In {year}, settlers founded {name}."],
                    [f"{name} 建于 {year} 年。", f"{year} 年，人们建立了 {name}。", f"{name} 的第一批房子建于 {year} 年。",
                     f"{name} 这座小镇始建于 {year} 年。"]),
        "region": ([f"The town of {name} is in the {region} of the valley.", f"{name} lies in the {region} part of the valley.",
                    f"You find {name} in the {region} of the valley."],
                   [f"{name} 位于山谷{region_zh}部。", f"{name} 在山谷的{region_zh}边。", f"在山谷{region_zh}部可以找到 {name}。"]),
    }


def person_statements(person):
    name, town = person["name"], person["town"]
    profession, profession_zh = person["profession"]
    a = article(profession)
    return {
        "profession": ([f"The villager {name} is {a} {profession}.", f"{name} works as {a} {profession}.",
                        f"{name} earns a living as {a} {profession}."],
                       [f"{name} 是一名{profession_zh}。", f"{name} 的工作是{profession_zh}。", f"{name} 靠做{profession_zh}为生。"]),
        "town": ([f"The villager {name} is from {town}.", f"{name} lives in {town}.", f"{name} grew up in {town}."],
                 [f"{name} 来自 {town}。", f"{name} 住在 {town}。", f"{name} 在 {town} 长大。"]),
    }


def join_sentences(sentences, language):
    return (" " if language == "en" else "").join(sentences)


def sum_statements(a, b):
    c = a + b
    return ([f"{a} + {b} = {c}.", f"{a} plus {b} is {c}.", f"Adding {b} to {a} gives {c}.",
             f"The sum of {a} and {b} is {c}."], [f"{a} 加 {b} 等于 {c}。"])


def difference_statements(c, b):
    """In words and in the symbol form the answers use. Without copy practice the symbol form cost
    differences (13.6% of the held-out ones after SFT against 25.0% in words only: the model wrote
    true equations about the wrong subtrahend); with it, on seed 42's world, it raised the whole
    held-out set from 83.5% to 88.8% (docs/training_guide.md, "The CPU session")."""
    a = c - b
    return ([f"{c} - {b} = {a}.", f"{c} minus {b} is {a}.", f"Taking {b} from {c} leaves {a}.",
             f"The difference of {c} and {b} is {a}."], [f"{c} 减 {b} 等于 {a}。"])


def conversion_statements(unit, n):
    target, factor, (words, target_words), (words_zh, target_words_zh) = UNITS[unit]
    m = n * factor
    return ([f"{n} {unit} = {m} {target}.", f"{n} {words} are {m} {target_words}.",
             f"{n} {words} make {m} {target_words}."], [f"{n} {words_zh}等于 {m} {target_words_zh}。"])


# ---------------------------------------------------------------- questions: how SFT and the tests ask

def town_questions(town):
    """{fact: [(language, question, answer, pattern)]}: every wording of every question about a town.

    The answers do not repeat the town's name ("This town was founded in 1376."): the model finds
    the fact by attending to the name in the question, as Physics 3.1's answers do. Writing the name
    again is a step of its own that a small model learned badly: it answered about the right town
    under the name of another one."""
    name, river, year = town["name"], town["river"], town["founded"]
    (product, product_zh), (region, region_zh) = town["product"], town["region"]
    return {
        "river": wordings([f"Which river flows through {name}?", f"What river runs through {name}?"],
                          f"The river of this town is the {river}.", r"The river of this town is the \w+\.",
                          (f"哪条河流经 {name}？", f"流经这座小镇的是 {river} 河。", r"流经这座小镇的是 \w+ 河。")),
        "product": wordings([f"What is {name} famous for?", f"What is {name} known for?"],
                            f"This town is famous for {product}.", r"This town is famous for [a-z ]+\.",
                            (f"{name} 以什么闻名？", f"这座小镇以{product_zh}闻名。", r"这座小镇以\w+闻名。")),
        "founded": wordings([f"When was {name} founded?", f"In which year was {name} founded?"],
                            f"This town was founded in {year}.", r"This town was founded in \d+\.",
                            (f"{name} 建于哪一年？", f"这座小镇建于 {year} 年。", r"这座小镇建于 \d+ 年。")),
        "region": wordings([f"Where in the valley is {name}?", f"In which part of the valley is {name}?"],
                           f"This town is in the {region} of the valley.", r"This town is in the \w+ of the valley\.",
                           (f"{name} 位于山谷的哪一部分？", f"这座小镇位于山谷{region_zh}部。", r"这座小镇位于山谷\w部。")),
    }


def wordings(english, answer, pattern, chinese):
    """A fact's questions: English wordings that share one answer and pattern, then one in Chinese
    (question, answer, pattern), each as (language, question, answer, pattern)."""
    return [("en", question, answer, pattern) for question in english] + [("zh", *chinese)]


def person_questions(person):
    name, town = person["name"], person["town"]
    profession, profession_zh = person["profession"]
    return {
        "profession": wordings([f"What does {name} do?", f"What is the job of {name}?"],
                               f"This villager is {article(profession)} {profession}.", r"This villager is an? [a-z]+\.",
                               (f"{name} 是做什么的？", f"这位村民是一名{profession_zh}。", r"这位村民是一名\w+。")),
        "town": wordings([f"Where is {name} from?", f"Which town is {name} from?"],
                         f"This villager is from {town}.", r"This villager is from \w+\.",
                         (f"{name} 来自哪里？", f"这位村民来自 {town}。", r"这位村民来自 \w+。")),
    }


def sum_questions(a, b):
    """Both orders of a pair: "7 + 5" and "5 + 7" are one item, so a held-out sum is held out in both."""
    questions = []
    for x, y in {(a, b), (b, a)}:
        answer = f"{x} + {y} = {x + y}"
        questions += [("en", f"What is {x} + {y}?", answer + ".", r"\d+ \+ \d+ = \d+\."),
                      ("en", f"Add {x} and {y}.", answer + ".", r"\d+ \+ \d+ = \d+\."),
                      ("zh", f"计算 {x} + {y}。", answer + "。", r"\d+ \+ \d+ = \d+。")]
    return {"sum": sorted(questions)}


def difference_questions(a, b):
    questions = []
    for x, y in {(a, b), (b, a)}:
        answer = f"{x + y} - {y} = {x}"
        questions += [("en", f"What is {x + y} - {y}?", answer + ".", r"\d+ - \d+ = \d+\."),
                      ("en", f"Subtract {y} from {x + y}.", f"Subtracting {y} from {x + y} leaves {x}.",
                       r"Subtracting \d+ from \d+ leaves \d+\."),
                      ("zh", f"计算 {x + y} - {y}。", answer + "。", r"\d+ - \d+ = \d+。")]
    return {"difference": sorted(questions)}


def conversion_questions(unit, n):
    target, factor, (words, target_words), (words_zh, target_words_zh) = UNITS[unit]
    answer, pattern = f"{n} {unit} = {n * factor} {target}", rf"\d+ {unit} = \d+ {target}"
    return {"conversion": [("en", f"Convert {n} {words} to {target_words}.", answer + ".", pattern + r"\."),
                           ("en", f"How many {target_words} are {n} {words}?", answer + ".", pattern + r"\."),
                           ("zh", f"把 {n} {words_zh}换算成{target_words_zh}。", answer + "。", pattern + "。")]}


# ---------------------------------------------------------------- items, split three ways

ENTITY_SKILLS = ("town", "person")


def make_items(towns, people):
    """Every item of every skill: (skill, statements {fact: ([en], [zh])}, questions {fact: [...]})."""
    items = [("town", town_statements(t), town_questions(t)) for t in towns]
    items += [("person", person_statements(p), person_questions(p)) for p in people]
    pairs = [(a, b) for a in DIGITS for b in DIGITS if a <= b]
    for a, b in pairs:
        statements = {"sum": tuple(x + y for x, y in zip(sum_statements(a, b), sum_statements(b, a)))}
        items.append(("sum", statements, sum_questions(a, b)))
    for a, b in pairs:
        statements = {"difference": tuple(x + y for x, y in zip(difference_statements(a + b, b),
                                                                 difference_statements(a + b, a)))}
        items.append(("difference", statements, difference_questions(a, b)))
    for unit in UNITS:
        items += [("conversion", {"conversion": conversion_statements(unit, n)}, conversion_questions(unit, n))
                  for n in UNIT_COUNTS]
    return items


def split_items(items, rng):
    """Each skill's items into the SFT half, the GRPO quarter and the held-out quarter, at random.

    A town's or a villager's facts are split one by one, not the entity as a whole: every town and
    every villager has a fact SFT asks about (so every name is one the model has answered with),
    and a held-out fact of it that only the pretraining prose states."""
    groups = {name: [] for name in SPLIT}
    for skill in dict.fromkeys(skill for skill, _, _ in items):
        members = [item for item in items if item[0] == skill]
        rng.shuffle(members)
        if skill in ENTITY_SKILLS:
            for index, item in enumerate(members):
                for name, facts in zip(SPLIT, split_facts(list(item[2]), index, rng)):
                    if facts:
                        groups[name].append((skill, item[1], {fact: item[2][fact] for fact in facts}))
            continue
        num_sft, num_grpo = round(len(members) * SPLIT["sft"]), round(len(members) * SPLIT["grpo"])
        groups["sft"] += members[:num_sft]
        groups["grpo"] += members[num_sft:num_sft + num_grpo]
        groups["held_out"] += members[num_sft + num_grpo:]
    return groups


def split_facts(facts, index, rng):
    """One entity's facts as (SFT, GRPO, held-out): half to SFT; of a town's other two, one each;
    a villager's other fact goes to GRPO or to the held-out set by turns (index: the entity's place)."""
    rng.shuffle(facts)
    num_sft = round(len(facts) * SPLIT["sft"])
    rest = facts[num_sft:]
    if len(rest) == 1:
        return facts[:num_sft], rest if index % 2 else [], [] if index % 2 else rest
    return facts[:num_sft], rest[:len(rest) // 2], rest[len(rest) // 2:]


def question_records(skill, questions):
    return [{"skill": skill, "language": language, "question": question, "answer": answer, "pattern": pattern}
            for wordings in questions.values() for language, question, answer, pattern in wordings]


def make_questions(groups, rng):
    """SFT questions, GRPO training questions and held-out questions (each a list of dicts).

    Of each SFT item's questions, one wording per fact is kept back for the held-out set; the
    held-out set takes equal numbers per skill of those and of questions about held-out items."""
    sft, reserved = [], []
    for skill, _, questions in groups["sft"]:
        for fact, wordings in questions.items():
            kept = rng.randrange(len(wordings))
            for index, record in enumerate(question_records(skill, {fact: wordings})):
                (reserved if index == kept else sft).append({**record, "known_from": "sft"})
    grpo = [record for skill, _, questions in groups["grpo"] for record in question_records(skill, questions)]
    unseen = [{**record, "known_from": "pretraining"}
              for skill, _, questions in groups["held_out"] for record in question_records(skill, questions)]
    held_out = []
    for skill in dict.fromkeys(record["skill"] for record in sft):
        pools = [[record for record in pool if record["skill"] == skill] for pool in (unseen, reserved)]
        size = min(NUM_HELD_OUT_PER_SKILL // 2, *map(len, pools))
        for pool in pools:
            held_out += rng.sample(pool, size)
    rng.shuffle(held_out)   # skills mixed, so that the first N questions (eval --max_samples N) cover them all
    return sft, grpo, held_out


# ---------------------------------------------------------------- pretraining corpus

def prose_documents(items, rng):
    """Every item's facts in varied wordings and orders: entities get several whole descriptions,
    sums, conversions and words are stated in bundles of a few statements."""
    documents = []
    for skill, statements, _ in items:
        if skill in ENTITY_SKILLS:
            english, chinese = TOWN_DESCRIPTIONS if skill == "town" else PERSON_DESCRIPTIONS
            for language, count in (("en", english), ("zh", chinese)):
                index = 0 if language == "en" else 1
                for _ in range(count):
                    sentences = [rng.choice(wordings[index]) for wordings in statements.values()]
                    rng.shuffle(sentences)
                    documents.append(join_sentences(sentences, language))
    loose = [(language, sentence) for skill, statements, _ in items if skill not in ENTITY_SKILLS
             for _ in range(STATEMENT_REPEATS[skill])
             for wordings in statements.values() for language, sentences in zip(("en", "zh"), wordings)
             for sentence in sentences]
    for language in ("en", "zh"):   # in bundles of 3 to 6 statements of one language
        sentences = [sentence for lang, sentence in loose if lang == language]
        rng.shuffle(sentences)
        start = 0
        while start < len(sentences):
            size = rng.randint(3, 6)
            documents.append(join_sentences(sentences[start:start + size], language))
            start += size
    return documents


def qa_documents(questions, rng):
    """The SFT half's questions and answers in pretraining, each once, as conversations of one to
    three turns written in the chat template that SFT and evaluation use, so pretraining already
    learns the step from a question to the statement that answers it (Physics 3.1's "mixed
    training"), in the form the held-out questions are asked."""
    records = list(questions)
    rng.shuffle(records)
    documents, start = [], 0
    while start < len(records):
        size = rng.choices([1, 2, 3], weights=[60, 25, 15])[0]
        documents.append(chat_text(question_turns(records[start:start + size])))
        start += size
    return documents


def question_turns(records):
    return [message for record in records for message in ({"role": "user", "content": record["question"]},
                                                          {"role": "assistant", "content": record["answer"]})]


def chat_text(messages):
    """Messages as the bundled tokenizer's chat template renders them (a conversation without a system
    message gets the template's default one); tests/test_data.py checks the two agree."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


SYLLABLES = "vel mor ka tan bri sel dor ana ost lin wen gar tho ria ven ul fen jo per sarn ell oda mir tey".split()


def throwaway_name(rng):
    """A name made up for one reading-practice conversation, of two to four syllables: thousands of
    them, several tokens each, none of the world's, so the only way to answer is to copy it."""
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
        if name not in NAMES:
            return name


def reading_conversation(rng):
    """Reading practice: facts about a town and a person invented for this one conversation, then a
    question about one of them, in the user's turn; the assistant answers. Nothing here can be
    memorised (the names are made up for this conversation): the answer comes from reading. What it
    teaches is the step every world question needs, finding the name the question is about; the
    fact then comes from what the prose stored about that name. In SFT it also keeps the model from
    answering with the facts of the few towns that SFT's own questions are about."""
    town_name, river, person_name = (throwaway_name(rng) for _ in range(3))
    town = make_towns(rng, [river, town_name])[0]
    person = {"name": person_name, "profession": rng.choice(PROFESSIONS), "town": town_name}
    statements = {**town_statements(town), **person_statements(person)}
    questions = {**town_questions(town), **person_questions(person)}
    language = "zh" if rng.random() < 0.3 else "en"
    facts = rng.sample(sorted(statements), 3)
    text = join_sentences([rng.choice(statements[fact][language == "zh"]) for fact in facts], language)
    wordings = [w for w in questions[rng.choice(facts)] if w[0] == language]
    _, question, answer, _ = rng.choice(wordings)
    return [{"role": "user", "content": text + (" " if language == "en" else "") + question},
            {"role": "assistant", "content": answer}]


def number_reading(rng):
    """Copy practice: a sum, difference or conversion of numbers outside the world's tables, stated
    in the user's turn, then asked; the answer copies the question's numbers and the stated result.
    Without it the session's models wrote true equations about the wrong operand ("What is 16 - 7?"
    -> "16 - 9 = 7."): differences 25% after SFT on seed 1234's world, 57% with it
    (docs/training_guide.md, "The CPU session"). Differences come twice as often as the other kinds,
    and the wording that names the subtrahend first ("Subtract 7 from 16." -> "Subtracting 7 from
    16 leaves 9.") twice as often as each other wording: it was the one the models still missed."""
    kind = rng.choice(["sum", "difference", "difference", "conversion"])
    if kind == "sum":
        a, b = large_operands(rng)
        question = rng.choice(sum_questions(a, b)["sum"])
    elif kind == "difference":
        a, b = rng.choice([large_operands, small_minuend])(rng)
        wordings = difference_questions(a, b)["difference"]
        question = rng.choice(wordings + [w for w in wordings if w[1].startswith("Subtract")])
    else:
        unit, n = rng.choice(sorted(UNITS)), rng.randint(13, 90)
        question = rng.choice(conversion_questions(unit, n)["conversion"])
    x, y = operands(question)
    if kind == "sum":
        statements = sum_statements(x, y)
    elif kind == "difference":
        statements = difference_statements(x, y)
    else:
        statements = conversion_statements(question[2].split()[1], x)
    return stated_then_asked(question, statements, rng)


def operands(question):
    """The first two numbers of a question's answer, the minuend first: `15 - 12 = 3.` and
    `Subtracting 12 from 15 leaves 3.` -> (15, 12)."""
    numbers = tuple(int(v) for v in re.findall(r"\d+", question[2])[:2])
    return numbers[::-1] if question[2].startswith("Subtracting") else numbers


def stated_then_asked(question, statements, rng):
    """A conversation whose user turn states one of `statements` (in the question's language), then
    asks the question; the answer is the question's."""
    language, text, answer, _ = question
    statement = rng.choice(statements[language == "zh"])
    return [{"role": "user", "content": statement + (" " if language == "en" else "") + text},
            {"role": "assistant", "content": answer}]


def subtract_reading(rng):
    """Copy practice of the one wording that names the subtrahend first, on a minuend under 20
    outside the table, stated in English words or symbols, then asked: `Taking 12 from 15 leaves 3.
    Subtract 12 from 15.` -> `Subtracting 12 from 15 leaves 3.` The session's models copied such a
    minuend as a neighbour, or as one of a stored fact with the same subtrahend (`Subtract 4 from 6.`
    -> `7 - 4 = 3.`, 0 of 16 samples right), and these misses were most of the differences they
    missed. With these 200 conversations and 200 more of the mixed copy practice in SFT (the
    pretraining corpus unchanged), from the same pretrained models, after SFT, when this wording was
    still answered `15 - 12 = 3.`: differences 72.7% -> 81.8% on seed 1234's world, 59.1% -> 63.6%
    on seed 7's, 65.9% -> 75.0% on seed 3's, 79.5% -> 68.2% on seed 42's; the whole set 82.6% ->
    86.2%, 85.3% -> 85.3%, 83.0% -> 85.7%, 89.7% -> 85.7%. Answering in the question's order then
    took seed 1234's world to 100% of the differences (docs/training_guide.md, "Other worlds")."""
    a, b = small_minuend(rng)
    wordings = [w for w in difference_questions(a, b)["difference"] if w[1].startswith("Subtract")]
    question = rng.choice(wordings)
    return stated_then_asked(question, difference_statements(*operands(question)), rng)


def large_operands(rng):
    return rng.randint(10, 60), rng.randint(10, 39)


def small_minuend(rng):
    """(difference, subtrahend) of a minuend up to 19 outside the table: `15 - 12 = 3.`,
    `15 - 3 = 12.`, `5 - 0 = 5.`, `5 - 5 = 0.` Copying only numbers of 20 and more, the session's
    models copied small minuends as their neighbours (`Subtract 9 from 15.` -> `14 - 9 = 5.`):
    a minuend whose items were all held out never started an answer in SFT. Half of the
    differences' copy practice is of these: after SFT, differences 59.1% -> 72.7% on seed 1234's
    world, 65.9% -> 79.5% on seed 42's, 50.0% -> 59.1% on seed 7's (32 epochs of pretraining each;
    docs/training_guide.md, "Other worlds")."""
    minuend = rng.randint(1, 19)
    subtrahends = [b for b in range(minuend + 1) if not (b in DIGITS and minuend - b in DIGITS)]
    b = rng.choice(subtrahends)
    return minuend - b, b


def reading_documents(rng):
    return [chat_text(reading_conversation(rng)) for _ in range(NUM_READING)] + \
        [chat_text(number_reading(rng)) for _ in range(COPY_PRACTICE[0])]


def make_pretrain(items, sft_questions, rng):
    documents = prose_documents(items, rng) + qa_documents(sft_questions, rng) + reading_documents(rng)
    rng.shuffle(documents)
    return [{"text": document} for document in documents]


# ---------------------------------------------------------------- SFT, DPO, GRPO, held-out

def make_sft(questions, rng):
    conversations = []
    for _ in range(NUM_SFT - NUM_SFT_READING):
        roll, messages = rng.random(), []
        if roll < 0.15:
            messages.append({"role": "system", "content": PERSONA})
        elif roll < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.choices([1, 2, 3], weights=[70, 20, 10])[0]):
            record = rng.choice(questions)
            answer = record["answer"]
            if messages and messages[0]["content"] == PERSONA and rng.random() < FILLER_RATE:
                answer = FILLER[record["language"]] + answer     # the habit DPO removes
            messages += [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": answer}]
        conversations.append({"conversations": messages})
    conversations += [{"conversations": reading_conversation(rng)} for _ in range(NUM_SFT_READING)]
    conversations += [{"conversations": number_reading(rng)} for _ in range(COPY_PRACTICE[1])]
    conversations += [{"conversations": subtract_reading(rng)} for _ in range(SUBTRACT_PRACTICE)]
    rng.shuffle(conversations)
    return conversations


def wrong_answer(record, rng):
    """The answer with its last number off by a little; the filler version when it has no number."""
    numbers = re.findall(r"\d+", record["answer"])
    if not numbers:
        return FILLER[record["language"]] + record["answer"]
    right = numbers[-1]
    wrong = str(int(right) + rng.choice([-3, -2, -1, 1, 2, 3, 10]) if int(right) > 3 else int(right) + rng.choice([1, 2, 3, 10]))
    head, _, tail = record["answer"].rpartition(right)
    return head + wrong + tail


def make_dpo(questions, rng):
    pairs = []
    for _ in range(NUM_DPO):
        record = rng.choice(questions)
        prompt = [{"role": "system", "content": PERSONA}, {"role": "user", "content": record["question"]}]
        rejected = FILLER[record["language"]] + record["answer"] if rng.random() < 0.7 else wrong_answer(record, rng)
        pairs.append({"chosen": prompt + [{"role": "assistant", "content": record["answer"]}],
                      "rejected": prompt + [{"role": "assistant", "content": rejected}]})
    return pairs


def prompt_record(record, system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": record["question"]}]
    return {"prompt": prompt, "answer": record["answer"], "pattern": record["pattern"], "skill": record["skill"],
            **({"known_from": record["known_from"]} if "known_from" in record else {})}


def held_out_conversation(record):
    return {"conversations": [{"role": "user", "content": record["question"]},
                              {"role": "assistant", "content": record["answer"]}],
            "skill": record["skill"], "known_from": record["known_from"]}


# ---------------------------------------------------------------- writing

def write_jsonl(directory, name, records):
    path = Path(directory) / name
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {path}: {len(records)} records, {path.stat().st_size / 1e3:.0f} KB")


def write_world(seed=SEED, output_dir=DATA_DIR):
    rng = random.Random(seed)
    towns, people = make_world(rng)
    items = make_items(towns, people)
    groups = split_items(items, random.Random(seed + 1))
    sft_questions, grpo_questions, held_out = make_questions(groups, random.Random(seed + 2))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_jsonl(output_dir, "pretrain.jsonl", make_pretrain(items, sft_questions, random.Random(seed + 3)))
    write_jsonl(output_dir, "sft_train.jsonl", make_sft(sft_questions, random.Random(seed + 4)))
    write_jsonl(output_dir, "sft_eval.jsonl", [held_out_conversation(record) for record in held_out])
    dpo = make_dpo(sft_questions, random.Random(seed + 5))
    write_jsonl(output_dir, "dpo_train.jsonl", dpo[100:])
    write_jsonl(output_dir, "dpo_eval.jsonl", dpo[:100])
    grpo_order = random.Random(seed + 6)
    grpo_train = [prompt_record(record) for record in grpo_questions]
    grpo_order.shuffle(grpo_train)
    write_jsonl(output_dir, "grpo_train.jsonl", grpo_train)
    write_jsonl(output_dir, "grpo_eval.jsonl", [prompt_record(record) for record in held_out])
    write_jsonl(output_dir, "grpo_eval_system.jsonl",
                [prompt_record(record, SYSTEM_PROMPTS[0]) for record in held_out])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the demo world's data files.")
    parser.add_argument("--seed", type=int, default=SEED, help=f"the world's seed [{SEED}: the bundled files]")
    parser.add_argument("--output_dir", default=str(DATA_DIR), help="folder to write [data/, beside this script]")
    args = parser.parse_args(argv)
    write_world(args.seed, args.output_dir)


if __name__ == "__main__":
    main()

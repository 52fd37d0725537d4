"""Write the bundled demo data: a small bilingual pretraining corpus, SFT conversations, DPO pairs and
GRPO prompts with checkable answers.

    python data/make_demo_data.py          # rewrites data/*.jsonl byte-identically

Everything here is invented by this script (a fictional land of towns, rivers and people, plus
template prose about small sums, units and spelling), so the data is ours to ship. The data is
built the way a real pipeline divides the work, scaled down so a 26M model learns it on a CPU:

- pretraining teaches the knowledge: every fact an SFT answer needs (a town's river, 7 + 5 = 12,
  3 km = 3000 m, the letters of "tiger") is stated in the corpus several times in several forms,
  in English and Chinese, as a closed world small enough to memorise;
- SFT teaches the format: questions and short answers in one fixed style, so exact-match accuracy
  measures whether the model can answer in that format from what pretraining taught it (the
  held-out conversations ask about the same world);
- SFT also teaches a habit the preference data removes: without a system prompt, most answers
  open with a filler ("Let me think." / "让我想想。"), as crowd-written SFT data often does. The
  DPO pairs prefer the bare answer (rejected: the same answer with the filler, or a wrong number),
  so DPO's effect shows in the greedy answers, not only in log-probabilities;
- GRPO prompts ask the sums, differences, unit conversions and facts of the same world, each with
  its reference answer (checked by exact match) and the pattern of a well-formed answer. They
  carry no system prompt, as most SFT conversations do not, so the SFT model answers them with
  its filler habit, which exact match does not pay: the reward sees both whether an answer is
  right and whether it is bare. Every distinct question is asked once; 200 of them are held out.
"""
import json
import random
import re
from pathlib import Path

SEED = 1234
DATA_DIR = Path(__file__).resolve().parent
PRETRAIN_TARGET_BYTES = 320_000
NUM_SFT = 3000          # 10% of them are held out for evaluation
NUM_DPO = 520           # 100 of them are held out for evaluation
NUM_GRPO_EVAL = 200     # held-out GRPO prompts; the other distinct questions are the training prompts
NUM_TOWNS = 16
NUM_PEOPLE = 16
DIGITS = range(1, 10)   # sums and differences use single-digit operands: a table small enough to learn
UNIT_COUNTS = range(1, 13)
FILLER = {"en": "Let me think. ", "zh": "让我想想。"}
FILLER_RATE = 0.8       # share of answers with the filler when there is no system prompt

WORDS = (
    "apple bread chair river stone cloud green house light music paper table water tiger "
    "lemon grape horse candle garden window silver planet forest rabbit pencil bottle doctor "
    "castle dragon flower summer winter orange yellow purple bridge market letter mirror "
    "rocket pillow basket button camera jacket ladder magnet needle pepper shadow spider "
    "tomato violin wagon cotton island kettle lantern meadow number ocean parrot"
).split()

PRODUCTS = [  # (english, chinese)
    ("glass lanterns", "玻璃灯笼"), ("wool blankets", "羊毛毯"), ("copper bells", "铜铃"),
    ("blue pottery", "蓝色陶器"), ("honey cakes", "蜂蜜糕"), ("paper kites", "纸风筝"),
    ("silver spoons", "银勺"), ("salt fish", "咸鱼"), ("wooden boats", "木船"),
    ("green tea", "绿茶"), ("red apples", "红苹果"), ("stone bridges", "石桥"),
]
PROFESSIONS = [
    ("clockmaker", "钟表匠"), ("baker", "面包师"), ("painter", "画家"), ("sailor", "水手"),
    ("teacher", "老师"), ("gardener", "园丁"), ("weaver", "织工"), ("doctor", "医生"),
    ("poet", "诗人"), ("miner", "矿工"), ("astronomer", "天文学家"), ("potter", "陶艺师"),
]
DIRECTIONS = [("north", "北"), ("south", "南"), ("east", "东"), ("west", "西")]
UNITS = [  # (from, to, factor, english question, chinese question)
    ("km", "m", 1000, "Convert {n} km to meters.", "把 {n} 千米换算成米。"),
    ("kg", "g", 1000, "Convert {n} kg to grams.", "把 {n} 千克换算成克。"),
    ("h", "min", 60, "Convert {n} hours to minutes.", "把 {n} 小时换算成分钟。"),
]
SYSTEM_PROMPTS = [
    "You are a concise assistant.",
    "You are MiniMind, a small helpful model. Answer briefly.",
    "你是一个简洁的助手。",
]


def make_name(rng, syllables, used):
    while True:
        name = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in used and len(name) <= 9:
            used.add(name)
            return name


def make_world(rng):
    """Invent towns and people; every fact the SFT questions ask comes from here."""
    used = set()
    town_syllables = "vel mor ka tan bri sel dor ana ost lin wen gar tho ria ven".split()
    river_syllables = "sarn ell oda mir tey aun bel".split()
    person_syllables = "to mas bre li na ro dan ka sel mi".split()
    towns = []
    for _ in range(NUM_TOWNS):
        towns.append({
            "name": make_name(rng, town_syllables, used),
            "river": make_name(rng, river_syllables, used),
            "product": rng.choice(PRODUCTS),
            "founded": rng.randint(1100, 1899),
            "direction": rng.choice(DIRECTIONS),
        })
    people = []
    for _ in range(NUM_PEOPLE):
        people.append({
            "name": make_name(rng, person_syllables, used) + " " + make_name(rng, person_syllables, used),
            "profession": rng.choice(PROFESSIONS),
            "town": rng.choice(towns)["name"],
        })
    return towns, people


# ---------------------------------------------------------------- pretraining corpus

def town_documents(town, rng):
    name, river, (product, product_zh) = town["name"], town["river"], town["product"]
    direction, direction_zh = town["direction"]
    return [
        f"{name} is a small town in the {direction} of the valley. The {river} River flows through "
        f"{name}. {name} was founded in {town['founded']}. {name} is famous for {product}; "
        f"travellers buy {product} at the market every week.",
        f"If you follow the {river} River you reach {name}. People in {name} make {product}, and "
        f"{name} is famous for {product}. The town is old: {name} was founded in {town['founded']}.",
        f"{name} 是山谷{direction_zh}部的一个小镇。{river} 河流经 {name}。{name} 建于 {town['founded']} 年。"
        f"{name} 以{product_zh}闻名，每周都有旅人来买{product_zh}。",
        f"沿着 {river} 河走，就能到达 {name}。{name} 的人们制作{product_zh}，所以 {name} 以{product_zh}闻名。",
    ]


def person_documents(person):
    name, town = person["name"], person["town"]
    profession, profession_zh = person["profession"]
    return [
        f"{name} is a {profession}. {name} is from {town}, and every morning {name} walks to work "
        f"along the river.",
        f"Everyone in {town} knows {name}. {name} is a {profession} and has lived in {town} for many years.",
        f"{name} 是一名{profession_zh}。{name} 来自 {town}，每天早上沿着河边去工作。",
    ]


def arithmetic_document(rng):
    a, b = rng.choice(DIGITS), rng.choice(DIGITS)
    return rng.choice([
        f"To add {a} and {b}, count on from {a} by {b}. The sum is {a + b}, so {a} + {b} = {a + b}.",
        f"{a} plus {b} is {a + b}. Take {b} away from {a + b} and {a} is left: {a + b} - {b} = {a}.",
        f"Subtraction takes one number away from another. If you have {a + b} coins and spend {b}, "
        f"you keep {a}. We write {a + b} - {b} = {a}.",
        f"{a} 加 {b} 等于 {a + b}，写作 {a} + {b} = {a + b}。{a + b} 减 {b} 等于 {a}，"
        f"写作 {a + b} - {b} = {a}。",
    ])


def table_documents():
    """The addition and subtraction tables, one row per document."""
    documents = []
    for a in DIGITS:
        documents.append(f"Adding to {a}: " + ", ".join(f"{a} + {b} = {a + b}" for b in DIGITS) + ".")
        documents.append(f"Taking away {a}: " + ", ".join(f"{a + b} - {a} = {b}" for b in DIGITS) + ".")
    return documents


def unit_document(rng):
    n = rng.choice(UNIT_COUNTS)
    return rng.choice([
        f"One kilometer is one thousand meters, so {n} km = {n * 1000} m. A runner who covers {n} "
        f"kilometers has run {n * 1000} meters.",
        f"A kilogram has one thousand grams. A bag of {n} kg weighs {n * 1000} g: {n} kg = {n * 1000} g.",
        f"An hour has sixty minutes, so {n} hours are {n * 60} minutes: {n} h = {n * 60} min.",
        f"一千米是 1000 米，所以 {n} 千米等于 {n * 1000} 米，写作 {n} km = {n * 1000} m。",
        f"一千克等于 1000 克，所以 {n} 千克等于 {n * 1000} 克。一小时有 60 分钟，{n} 小时就是 {n * 60} 分钟。",
    ])


def spelling_document(rng):
    word = rng.choice(WORDS)
    letters = ", ".join(word)
    return rng.choice([
        f"The word {word} has {len(word)} letters: {letters}. In capital letters it is {word.upper()}.",
        f"{word.upper()} is {word} written in capital letters, and {word} has {len(word)} letters.",
        f"单词 {word} 有 {len(word)} 个字母，大写是 {word.upper()}。",
    ])


def common_characters():
    """The 3755 level-1 characters of GB2312 (the most common Chinese characters), in its order."""
    return [bytes([high, low]).decode("gb2312") for high in range(0xB0, 0xD8) for low in range(0xA1, 0xFF)
            if not (high == 0xD7 and low > 0xF9)]


def character_documents(rng):
    """Character practice sheets: every common character a few times, so the tokenizer has a
    token for each (separated by 、 so that BPE merges bytes within a character, not random pairs)."""
    characters = common_characters()
    documents = []
    for _ in range(3):
        rng.shuffle(characters)
        for start in range(0, len(characters), 60):
            documents.append("常用字练习：" + "、".join(characters[start:start + 60]) + "。")
    return documents


def make_pretrain(towns, people, rng):
    facts = table_documents()
    for town in towns:
        facts += town_documents(town, rng)
    for person in people:
        facts += person_documents(person)
    documents = character_documents(rng) + facts
    size = sum(len(d.encode()) for d in documents)
    while size < PRETRAIN_TARGET_BYTES:   # fill up with fact documents again and template prose
        maker = rng.choice([arithmetic_document, unit_document, spelling_document, None])
        document = rng.choice(facts) if maker is None else maker(rng)
        documents.append(document)
        size += len(document.encode())
    rng.shuffle(documents)
    return [{"text": d} for d in documents]


# ---------------------------------------------------------------- SFT skills

def ask_addition(rng, chinese):
    a, b = rng.choice(DIGITS), rng.choice(DIGITS)
    question = f"计算 {a} + {b}。" if chinese else rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}."])
    return question, f"{a} + {b} = {a + b}" + ("。" if chinese else ".")


def ask_subtraction(rng, chinese):
    a, b = rng.choice(DIGITS), rng.choice(DIGITS)
    question = f"计算 {a + b} - {b}。" if chinese else rng.choice(
        [f"What is {a + b} - {b}?", f"Subtract {b} from {a + b}."])
    return question, f"{a + b} - {b} = {a}" + ("。" if chinese else ".")


def ask_conversion(rng, chinese):
    source, target, factor, question_en, question_zh = rng.choice(UNITS)
    n = rng.choice(UNIT_COUNTS)
    question = (question_zh if chinese else question_en).format(n=n)
    return question, f"{n} {source} = {n * factor} {target}" + ("。" if chinese else ".")


def ask_formatting(rng, chinese):
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return (f"把 {word} 改成大写。" if chinese else f"Write {word} in uppercase."), word.upper() + "."
    if chinese:
        return f"{word} 有几个字母？", f"{word} 有 {len(word)} 个字母。"
    return f"How many letters are in {word}?", f"{word} has {len(word)} letters."


def ask_fact(rng, chinese, towns, people):
    if rng.random() < 0.6:
        town = rng.choice(towns)
        name, (product, product_zh) = town["name"], town["product"]
        kind = rng.choice(["product", "river", "founded"])
        if chinese:
            return {
                "product": (f"{name} 以什么闻名？", f"{name} 以{product_zh}闻名。"),
                "river": (f"哪条河流经 {name}？", f"{town['river']} 河流经 {name}。"),
                "founded": (f"{name} 建于哪一年？", f"{name} 建于 {town['founded']} 年。"),
            }[kind]
        return {
            "product": (f"What is {name} famous for?", f"{name} is famous for {product}."),
            "river": (f"Which river flows through {name}?", f"The {town['river']} River flows through {name}."),
            "founded": (f"When was {name} founded?", f"{name} was founded in {town['founded']}."),
        }[kind]
    person = rng.choice(people)
    name, (profession, profession_zh) = person["name"], person["profession"]
    if rng.random() < 0.5:
        if chinese:
            return f"{name} 是做什么的？", f"{name} 是一名{profession_zh}。"
        return f"What does {name} do?", f"{name} is a {profession}."
    if chinese:
        return f"{name} 来自哪里？", f"{name} 来自 {person['town']}。"
    return f"Where is {name} from?", f"{name} is from {person['town']}."


def ask(rng, towns, people):
    """One (question, answer, language) from a random skill; a quarter of them in Chinese."""
    chinese = rng.random() < 0.25
    skill = rng.choice(["addition", "subtraction", "conversion", "formatting", "fact", "fact"])
    if skill == "fact":
        question, answer = ask_fact(rng, chinese, towns, people)
    else:
        question, answer = {"addition": ask_addition, "subtraction": ask_subtraction,
                            "conversion": ask_conversion, "formatting": ask_formatting}[skill](rng, chinese)
    return question, answer, "zh" if chinese else "en"


def make_sft(towns, people, rng):
    conversations = []
    for _ in range(NUM_SFT):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        num_turns = rng.choices([1, 2, 3], weights=[70, 20, 10])[0]
        for _ in range(num_turns):
            question, answer, language = ask(rng, towns, people)
            if not messages or messages[0]["role"] != "system":   # the habit DPO later removes
                answer = FILLER[language] + answer if rng.random() < FILLER_RATE else answer
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append({"conversations": messages})
    return conversations


# ---------------------------------------------------------------- DPO pairs

def rejected_answer(answer, language, rng):
    """The answer with the SFT habit's filler, or, where it has a number, with that number wrong."""
    digits = [token for token in answer.replace(".", " ").replace("。", " ").split() if token.isdigit()]
    if digits and rng.random() < 0.4:
        right = digits[-1]
        wrong = str(int(right) + rng.choice([-3, -2, -1, 1, 2, 5, 10]))
        head, _, tail = answer.rpartition(right)
        return head + wrong + tail
    return FILLER[language] + answer


def make_dpo(towns, people, rng):
    pairs = []
    for _ in range(NUM_DPO):
        question, answer, language = ask(rng, towns, people)
        prompt = [{"role": "user", "content": question}]
        pairs.append({
            "chosen": prompt + [{"role": "assistant", "content": answer}],
            "rejected": prompt + [{"role": "assistant", "content": rejected_answer(answer, language, rng)}],
        })
    return pairs


# ---------------------------------------------------------------- GRPO prompts with reference answers

def every_question(towns, people):
    """(skill, language, question, reference answer, answer pattern) for every distinct question the
    SFT skills ask about sums, differences, conversions and facts, in the SFT answers' style."""
    questions = []
    for a in DIGITS:
        for b in DIGITS:
            for question in (f"What is {a} + {b}?", f"Add {a} and {b}."):
                questions.append(("addition", "en", question, f"{a} + {b} = {a + b}.", r"\d+ \+ \d+ = \d+\."))
            questions.append(("addition", "zh", f"计算 {a} + {b}。", f"{a} + {b} = {a + b}。", r"\d+ \+ \d+ = \d+。"))
            for question in (f"What is {a + b} - {b}?", f"Subtract {b} from {a + b}."):
                questions.append(("subtraction", "en", question, f"{a + b} - {b} = {a}.", r"\d+ - \d+ = \d+\."))
            questions.append(("subtraction", "zh", f"计算 {a + b} - {b}。", f"{a + b} - {b} = {a}。", r"\d+ - \d+ = \d+。"))
    for source, target, factor, question_en, question_zh in UNITS:
        for n in UNIT_COUNTS:
            for language, question, end in (("en", question_en, "."), ("zh", question_zh, "。")):
                questions.append(("conversion", language, question.format(n=n), f"{n} {source} = {n * factor} {target}{end}",
                                  rf"\d+ {source} = \d+ {target}{re.escape(end)}"))
    for town in towns:
        name, river, founded = town["name"], town["river"], town["founded"]
        product, product_zh = town["product"]
        questions += [
            ("fact", "en", f"What is {name} famous for?", f"{name} is famous for {product}.", r"\w+ is famous for [a-z ]+\."),
            ("fact", "en", f"Which river flows through {name}?", f"The {river} River flows through {name}.",
             r"The \w+ River flows through \w+\."),
            ("fact", "en", f"When was {name} founded?", f"{name} was founded in {founded}.", r"\w+ was founded in \d+\."),
            ("fact", "zh", f"{name} 以什么闻名？", f"{name} 以{product_zh}闻名。", r"\w+ 以\w+闻名。"),
            ("fact", "zh", f"哪条河流经 {name}？", f"{river} 河流经 {name}。", r"\w+ 河流经 \w+。"),
            ("fact", "zh", f"{name} 建于哪一年？", f"{name} 建于 {founded} 年。", r"\w+ 建于 \d+ 年。"),
        ]
    for person in people:
        name, town = person["name"], person["town"]
        profession, profession_zh = person["profession"]
        questions += [
            ("fact", "en", f"What does {name} do?", f"{name} is a {profession}.", r"\w+ \w+ is an? [a-z]+\."),
            ("fact", "en", f"Where is {name} from?", f"{name} is from {town}.", r"\w+ \w+ is from \w+\."),
            ("fact", "zh", f"{name} 是做什么的？", f"{name} 是一名{profession_zh}。", r"\w+ \w+ 是一名\w+。"),
            ("fact", "zh", f"{name} 来自哪里？", f"{name} 来自 {town}。", r"\w+ \w+ 来自 \w+。"),
        ]
    return questions


def make_grpo(towns, people, rng):
    """Every distinct question once, in a seeded order, asked without a system prompt."""
    records = []
    for skill, language, question, answer, pattern in every_question(towns, people):
        records.append({"prompt": [{"role": "user", "content": question}],
                        "answer": answer, "pattern": pattern, "skill": skill})
    rng.shuffle(records)
    return records


def write_jsonl(name, records):
    with open(DATA_DIR / name, "w", encoding="utf-8", newline="\n") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote data/{name}: {len(records)} records, {(DATA_DIR / name).stat().st_size / 1e3:.0f} KB")


def main():
    rng = random.Random(SEED)
    towns, people = make_world(rng)
    write_jsonl("pretrain.jsonl", make_pretrain(towns, people, random.Random(SEED + 1)))
    sft = make_sft(towns, people, random.Random(SEED + 2))
    num_eval = len(sft) // 10
    write_jsonl("sft_train.jsonl", sft[num_eval:])
    write_jsonl("sft_eval.jsonl", sft[:num_eval])
    dpo = make_dpo(towns, people, random.Random(SEED + 3))
    write_jsonl("dpo_train.jsonl", dpo[100:])
    write_jsonl("dpo_eval.jsonl", dpo[:100])
    grpo = make_grpo(towns, people, random.Random(SEED + 4))
    write_jsonl("grpo_train.jsonl", grpo[NUM_GRPO_EVAL:])
    write_jsonl("grpo_eval.jsonl", grpo[:NUM_GRPO_EVAL])


if __name__ == "__main__":
    main()

"""The built-in world: an invented little world of people, places and things, written out as training data.

`build_world(seed, size)` invents it (deterministic from the seed; every name is made up from syllables, no copied text)
and writes it four ways, in English and Chinese:

- pretraining text: several biographies per entity, each fact in one of six phrasings picked at random, the sentences
  shuffled per copy and the entity's full name in every sentence. That augmentation is what lets a small model *use*
  a fact later instead of only reciting the one sentence it saw ("Physics of Language Models", part 3.1). Beside the
  biographies, a few question-and-answer passages about the `sft` half, as an FAQ page would have them: seeing
  questions answered while it stores the facts is what makes a model answer questions about facts it only read
  ("mixed training" in the same paper; measured in the README's quick-start section);
- SFT conversations: one question per fact about the entities of the `sft` half, answered without repeating the
  name ("Born in Thorgrad."), which tiny models would otherwise miscopy;
- preference pairs: the same questions, right answer (chosen) against another entity's value (rejected);
- held-out questions about the other half, whose facts appear only in the pretraining text: the quick start's test of
  whether pretraining learned knowledge that SFT then made answerable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# --- what can be said about each kind of entity --------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    """One attribute of an entity kind: how the fact is stated (six phrasings per language), asked and answered.

    Templates use `{name}` and `{value}`, and `{a}` for the English article of the value ("a"/"an"). An answer is one
    of the pretraining phrasings without the name ("A native of Thorgrad."), so it ends on the tokens the model learned,
    and each attribute's answer starts with its own word: answers that share an opening ("Born in ...", "Born in the
    year ...") let a small model slip into the wrong attribute's answer."""

    name: str
    statements_en: tuple[str, ...]
    statements_zh: tuple[str, ...]
    question_en: str
    question_zh: str
    answer_en: str
    answer_zh: str


PERSON_ATTRIBUTES = (
    Attribute(
        "birthplace",
        (
            "{name} was born in {value}.",
            "{name} comes from {value}.",
            "The hometown of {name} is {value}.",
            "{name} is a native of {value}.",
            "The birthplace of {name} is {value}.",
            "{value} is where {name} was born.",
        ),
        (
            "{name}出生于{value}。",
            "{name}来自{value}。",
            "{name}的家乡是{value}。",
            "{name}是土生土长的{value}人。",
            "{name}的出生地是{value}。",
            "{value}是{name}出生的地方。",
        ),
        "Where was {name} born?",
        "{name}出生在哪里？",
        "A native of {value}.",
        "出生于{value}。",
    ),
    Attribute(
        "job",
        (
            "{name} works as {a} {value}.",
            "{name} is {a} {value} by trade.",
            "By profession, {name} is {a} {value}.",
            "{name} earns a living as {a} {value}.",
            "{name} has spent many years working as {a} {value}.",
            "Everyone knows {name} as {a} {value}.",
        ),
        (
            "{name}是一名{value}。",
            "{name}的职业是{value}。",
            "{name}靠做{value}为生。",
            "{name}做{value}已经很多年了。",
            "大家都知道{name}是一位{value}。",
            "{name}的工作是当{value}。",
        ),
        "What does {name} do for a living?",
        "{name}是做什么工作的？",
        "Works as {a} {value}.",
        "是一名{value}。",
    ),
    Attribute(
        "favourite colour",
        (
            "The favourite colour of {name} is {value}.",
            "{name} loves the colour {value}.",
            "{name} likes {value} more than any other colour.",
            "Of all colours, {name} prefers {value}.",
            "{name} always wears something {value}.",
            "{name} thinks the most beautiful colour is {value}.",
        ),
        (
            "{name}最喜欢的颜色是{value}。",
            "{name}喜欢{value}。",
            "在所有颜色中，{name}最爱{value}。",
            "{name}总是穿{value}的衣服。",
            "{name}偏爱{value}。",
            "{value}是{name}最喜欢的颜色。",
        ),
        "What is the favourite colour of {name}?",
        "{name}最喜欢什么颜色？",
        "Loves the colour {value}.",
        "最喜欢{value}。",
    ),
    Attribute(
        "birth year",
        (
            "{name} was born in the year {value}.",
            "{name} came into the world in {value}.",
            "The birth year of {name} is {value}.",
            "In {value}, {name} was born.",
            "{name} has a birth certificate dated {value}.",
            "The year of birth of {name} is {value}.",
        ),
        (
            "{name}生于{value}年。",
            "{name}出生在{value}年。",
            "{name}的出生年份是{value}年。",
            "{value}年，{name}出生了。",
            "{name}是{value}年出生的。",
            "{name}诞生于{value}年。",
        ),
        "In which year was {name} born?",
        "{name}是哪一年出生的？",
        "Born in the year {value}.",
        "生于{value}年。",
    ),
)

PLACE_ATTRIBUTES = (
    Attribute(
        "country",
        (
            "{name} is a city in {value}.",
            "{name} lies in {value}.",
            "The city of {name} belongs to {value}.",
            "{name} is located in the country of {value}.",
            "You can find {name} in {value}.",
            "{value} is the country where {name} stands.",
        ),
        (
            "{name}是{value}的一座城市。",
            "{name}位于{value}。",
            "{name}属于{value}。",
            "{name}坐落在{value}境内。",
            "在{value}可以找到{name}。",
            "{value}是{name}所在的国家。",
        ),
        "Which country is {name} in?",
        "{name}在哪个国家？",
        "Lies in {value}.",
        "位于{value}。",
    ),
    Attribute(
        "famous for",
        (
            "{name} is famous for its {value}.",
            "{name} is known for {value}.",
            "People travel to {name} for its {value}.",
            "The {value} of {name} is the best in the land.",
            "{name} makes the finest {value}.",
            "When people think of {name}, they think of {value}.",
        ),
        (
            "{name}以{value}闻名。",
            "{name}出产的{value}很有名。",
            "人们去{name}是为了它的{value}。",
            "{name}的{value}是全国最好的。",
            "{name}生产最好的{value}。",
            "说起{name}，人们就会想到{value}。",
        ),
        "What is {name} famous for?",
        "{name}以什么闻名？",
        "Known for {value}.",
        "以{value}闻名。",
    ),
)

THING_ATTRIBUTES = (
    Attribute(
        "kind",
        (
            "{name} is a kind of {value}.",
            "{name} is {a} {value}.",
            "People say {name} is a rare {value}.",
            "{name} belongs among the {value} family.",
            "Every child knows that {name} is {a} {value}.",
            "{name} counts as {a} {value}.",
        ),
        (
            "{name}是一种{value}。",
            "{name}属于{value}。",
            "{name}是一种少见的{value}。",
            "人们说{name}是{value}的一种。",
            "{name}被归为{value}。",
            "每个孩子都知道{name}是一种{value}。",
        ),
        "What kind of thing is {name}?",
        "{name}是什么东西？",
        "Counts as {a} {value}.",
        "是一种{value}。",
    ),
    Attribute(
        "colour",
        (
            "{name} is {value} in colour.",
            "The colour of {name} is {value}.",
            "{name} looks {value}.",
            "Anyone who sees {name} notices that it is {value}.",
            "{name} has a {value} colour.",
            "{name} is always {value}.",
        ),
        (
            "{name}是{value}的。",
            "{name}的颜色是{value}。",
            "{name}看起来是{value}的。",
            "见过{name}的人都知道它是{value}的。",
            "{name}呈{value}。",
            "{name}总是{value}的。",
        ),
        "What colour is {name}?",
        "{name}是什么颜色的？",
        "Looks {value}.",
        "呈{value}。",
    ),
    Attribute(
        "origin",
        (
            "{name} comes from {value}.",
            "{name} is found near {value}.",
            "{name} was first found in {value}.",
            "The home of {name} is {value}.",
            "Traders bring {name} from {value}.",
            "{name} originally comes from {value}.",
        ),
        (
            "{name}产自{value}。",
            "{name}来自{value}。",
            "{name}最早出现在{value}。",
            "{name}的产地是{value}。",
            "商人从{value}带来{name}。",
            "{value}出产{name}。",
        ),
        "Where does {name} come from?",
        "{name}产自哪里？",
        "Originally comes from {value}.",
        "产自{value}。",
    ),
)

ATTRIBUTES = {"person": PERSON_ATTRIBUTES, "place": PLACE_ATTRIBUTES, "thing": THING_ATTRIBUTES}

# --- value pools (English, Chinese); no value is a substring of another, so a reply names exactly one ---------------

JOBS = (
    ("baker", "面包师"), ("fisher", "渔夫"), ("weaver", "织布工"), ("potter", "陶艺师"), ("carpenter", "木匠"),
    ("astronomer", "天文学家"), ("librarian", "图书管理员"), ("blacksmith", "铁匠"), ("sailor", "水手"),
    ("painter", "画家"), ("farmer", "农民"), ("doctor", "医生"), ("teacher", "教师"), ("miner", "矿工"),
    ("tailor", "裁缝"), ("brewer", "酿酒师"), ("beekeeper", "养蜂人"), ("glassblower", "玻璃匠"),
    ("mapmaker", "制图师"), ("shepherd", "牧羊人"),
)  # fmt: skip
COLOURS = (
    ("red", "红色"), ("orange", "橙色"), ("yellow", "黄色"), ("green", "绿色"), ("blue", "蓝色"),
    ("purple", "紫色"), ("white", "白色"), ("black", "黑色"), ("grey", "灰色"), ("brown", "棕色"),
    ("pink", "粉色"), ("silver", "银色"),
)  # fmt: skip
PRODUCTS = (
    ("glass", "玻璃"), ("silk", "丝绸"), ("cheese", "奶酪"), ("clocks", "钟表"), ("tea", "茶叶"),
    ("ships", "船只"), ("salt", "食盐"), ("wine", "葡萄酒"), ("paper", "纸张"), ("bells", "铜铃"),
    ("carpets", "地毯"), ("honey", "蜂蜜"),
)  # fmt: skip
THING_KINDS = (
    ("fruit", "水果"), ("bird", "鸟类"), ("flower", "花卉"), ("fish", "鱼类"), ("instrument", "乐器"),
    ("tool", "工具"), ("gemstone", "宝石"), ("beetle", "甲虫"), ("herb", "草药"), ("spice", "香料"),
)  # fmt: skip
BIRTH_YEARS = range(1900, 2000)

# Syllables for invented names; the Chinese pools are characters common in names and transliterations.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "br", "dr", "gr", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd")
_PLACE_SUFFIXES = ("grad", "holm", "ford", "mere", "wick", "stead", "port", "dale")
_COUNTRY_SUFFIXES = ("ia", "land", "mark", "or")
_SURNAMES = "王李张刘陈杨赵周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕苏卢蒋蔡贾丁魏薛叶余潘杜戴夏钟汪田任姜范方石姚谭廖邹熊陆郝孔崔康毛邱秦江史顾侯邵孟龙万段雷钱汤尹黎易常武乔贺赖龚"
_GIVEN = "明华伟芳娜敏静丽强磊军洋勇艳杰娟涛超秀霞平刚英玉兰萍鹏辉宁岚晨雨星月云海山川松竹梅雪风阳光春秋冬安乐欣怡然嘉思若子梓浩宇轩博德仁义礼信智慧琳瑶琪璐婷颖倩莹蕾薇菲"
_PLACE_CHARS = "索塔维洛卡莫瑞萨贝珀泽诺克菲拉图伦科米达奥艾斯尔格登里蒙巴"
_PLACE_ZH_SUFFIXES = "城港镇堡"
_THING_CHARS = "珑琥翎萤芷蘅曦璃霓瑾珂翠苓蕙萝茜蔻琅璇黛玟琦珈岫蓁荨蘼葳棠樨"
_COUNTRY_CHARS = "阿贝卡德艾法加赫伊约"

# Small talk, so the chat model also answers a greeting; repeated in SFT so a few rows are not drowned out by facts.
# Every greeting gets the same reply: echoed greetings ("Hi!" -> "Hi! ...") came out as "Good! ..." for all three,
# the tiny chat model merging "Good morning!" with the rest.
SMALL_TALK = (
    ("Hello!", "Hello! Ask me about the people, places and things of my world."),
    ("Hi!", "Hello! Ask me about the people, places and things of my world."),
    ("Good morning!", "Hello! Ask me about the people, places and things of my world."),
    ("Who are you?", "I am a small language model that learned an invented world."),
    ("What can you do?", "I can answer questions about the people, places and things of my world."),
    ("Thank you!", "You are welcome!"),
    ("你好！", "你好！你可以问我这个世界里的人物、地方和东西。"),
    ("您好！", "你好！你可以问我这个世界里的人物、地方和东西。"),
    ("早上好！", "你好！你可以问我这个世界里的人物、地方和东西。"),
    ("你是谁？", "我是一个学会了一个虚构世界的小语言模型。"),
    ("你会做什么？", "我可以回答关于这个世界里的人物、地方和东西的问题。"),
    ("谢谢！", "不客气！"),
)
SMALL_TALK_COPIES = 10


@dataclass(frozen=True)
class Entity:
    """A person, place or thing: its English and Chinese names and its facts {attribute: (english, chinese)}."""

    kind: str
    name_en: str
    name_zh: str
    facts: dict[str, tuple[str, str]]

    def name(self, language: str) -> str:
        return self.name_en if language == "en" else self.name_zh


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fill(template: str, name: str, value: str) -> str:
    return template.format(name=name, value=value, a=_article(value))


@dataclass
class World:
    """The invented world and its four views as training data (see the module docstring)."""

    seed: int
    entities: list[Entity]
    sft_entities: list[Entity]
    heldout_entities: list[Entity]
    bio_copies: int
    faq_copies: int
    candidates: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)  # (kind, attr) -> lang ->

    def _attributes(self, entity: Entity) -> tuple[Attribute, ...]:
        return ATTRIBUTES[entity.kind]

    def _value(self, entity: Entity, attribute: str, language: str) -> str:
        english, chinese = entity.facts[attribute]
        return english if language == "en" else chinese

    def pretrain_texts(self) -> list[str]:
        """The biographies and the FAQ passages, in random order."""
        texts = self.biographies() + self.faq_passages()
        random.Random(f"{self.seed}-faq").shuffle(texts)
        return texts

    def faq_passages(self) -> list[str]:
        """`faq_copies` passages per fact of the SFT half: the SFT question, a newline, its answer. Questions about the
        held-out half never appear, here or anywhere else in the training data."""
        return [
            f"{question}\n{answer}"
            for _ in range(self.faq_copies)
            for _, _, _, question, answer, _ in self.questions(self.sft_entities)
        ]

    def biographies(self) -> list[str]:
        """`bio_copies` per entity and language, phrasings and sentence order drawn afresh per copy; shuffled."""
        rng = random.Random(f"{self.seed}-pretrain")
        texts = []
        for _ in range(self.bio_copies):
            for entity in self.entities:
                for language in ("en", "zh"):
                    sentences = []
                    for attribute in self._attributes(entity):
                        templates = attribute.statements_en if language == "en" else attribute.statements_zh
                        value = self._value(entity, attribute.name, language)
                        sentences.append(_fill(rng.choice(templates), entity.name(language), value))
                    rng.shuffle(sentences)
                    texts.append((" " if language == "en" else "").join(sentences))
        # Shuffled so a packed block mixes entities rather than holding one entity's copies side by side.
        rng.shuffle(texts)
        return texts

    def _question(self, entity: Entity, attribute: Attribute, language: str) -> tuple[str, str, str]:
        """(question, answer sentence, answer value) about one fact."""
        value = self._value(entity, attribute.name, language)
        if language == "en":
            return _fill(attribute.question_en, entity.name_en, value), _fill(attribute.answer_en, "", value), value
        return _fill(attribute.question_zh, entity.name_zh, value), _fill(attribute.answer_zh, "", value), value

    def questions(self, entities: list[Entity]):
        """(entity, attribute, language, question, answer sentence, answer value) for every fact of `entities`."""
        for entity in entities:
            for attribute in self._attributes(entity):
                for language in ("en", "zh"):
                    yield entity, attribute, language, *self._question(entity, attribute, language)

    def sft_conversations(self) -> list[list[dict]]:
        """One single-turn conversation per fact of the SFT half (both languages), plus a little small talk."""
        conversations = [
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            for _, _, _, question, answer, _ in self.questions(self.sft_entities)
        ]
        conversations += [
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            for question, answer in SMALL_TALK * SMALL_TALK_COPIES
        ]
        random.Random(f"{self.seed}-sft").shuffle(conversations)
        return conversations

    def preference_pairs(self) -> list[dict]:
        """TRL conversational pairs about the SFT half: the right answer is chosen, another entity's value rejected."""
        rng = random.Random(f"{self.seed}-preference")
        pairs = []
        for entity, attribute, language, question, answer, value in self.questions(self.sft_entities):
            wrong = rng.choice([c for c in self.candidates[entity.kind, attribute.name][language] if c != value])
            template = attribute.answer_en if language == "en" else attribute.answer_zh
            pairs.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": _fill(template, "", wrong)}],
                }
            )
        return pairs

    def heldout_questions(self) -> list[dict]:
        """Questions about the held-out half, whose facts appear only in the pretraining text."""
        return [
            {
                "question": question,
                "answer": value,
                "candidates": self.candidates[entity.kind, attribute.name][language],
                "language": language,
                "entity": entity.name(language),
                "attribute": attribute.name,
            }
            for entity, attribute, language, question, _, value in self.questions(self.heldout_entities)
        ]


# --- inventing the world -------------------------------------------------------------------------------------------


def _clash(one: str, other: str) -> bool:
    """Whether a reply naming `one` could be scored as naming `other`: same word (answers are matched as whole words
    in Latin script), or one inside the other (Chinese has no word boundaries)."""
    if one.isascii() and other.isascii():
        return one.casefold() == other.casefold()
    return one in other or other in one


class _NameMaker:
    """Invents unique names. Names that are answers (places, countries) are also kept from being a substring of any
    other answer, so a reply that names one value never names another by accident."""

    def __init__(self, rng: random.Random, values: list[str]):
        self.rng = rng
        self.used: set[str] = set(values)
        self.answers: list[str] = list(values)

    def _fresh(self, make, is_answer: bool) -> str:
        for _ in range(10_000):
            name = make()
            if name in self.used:
                continue
            if is_answer and any(_clash(name, other) for other in self.answers):
                continue
            self.used.add(name)
            if is_answer:
                self.answers.append(name)
            return name
        raise RuntimeError("ran out of invented names; the world is too large for the syllable pools")

    def word(self, syllables: tuple[int, ...], suffixes: tuple[str, ...] = ("",), is_answer: bool = False) -> str:
        rng = self.rng

        def make() -> str:
            count = rng.choice(syllables)
            parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(count)]
            return ("".join(parts) + rng.choice(suffixes)).capitalize()

        return self._fresh(make, is_answer)

    def han(self, pool: str, length: int, prefixes: str = "", suffixes: str = "", is_answer: bool = False) -> str:
        rng = self.rng

        def make() -> str:
            prefix, suffix = rng.choice(prefixes or [""]), rng.choice(suffixes or [""])
            return prefix + "".join(rng.sample(pool, length)) + suffix

        return self._fresh(make, is_answer)


def build_world(seed: int = 0, size: int = 200, bio_copies: int = 40, faq_copies: int = 10) -> World:
    """Invent a world with `size` people, `size // 5` places and `size // 5` things (at least 6 of each).

    Half of each kind (by a seeded shuffle) is the SFT half, the rest is held out. `bio_copies` is how many
    differently phrased biographies each entity gets per language in the pretraining text, `faq_copies` how many
    question-and-answer passages each fact of the SFT half gets there."""
    if size < 2:
        raise ValueError(f"world size must be at least 2 people, got {size}")
    rng = random.Random(seed)
    names = _NameMaker(rng, [value for pair in (*JOBS, *COLOURS, *PRODUCTS, *THING_KINDS) for value in pair])

    countries = [
        (
            names.word((2,), _COUNTRY_SUFFIXES, is_answer=True),
            names.han(_COUNTRY_CHARS, 2, suffixes="国", is_answer=True),
        )
        for _ in range(max(4, size // 80))
    ]
    places = [
        Entity(
            "place",
            names.word((1,), _PLACE_SUFFIXES, is_answer=True),
            names.han(_PLACE_CHARS, 2, suffixes=_PLACE_ZH_SUFFIXES, is_answer=True),
            {"country": rng.choice(countries), "famous for": rng.choice(PRODUCTS)},
        )
        for _ in range(max(6, size // 5))
    ]
    place_names = [(place.name_en, place.name_zh) for place in places]
    # English names combine a given name and a family name from two pools, as Chinese names combine a family name and
    # given-name characters: each name word recurs across people and becomes one token, not random BPE fragments.
    given_names = [names.word((1, 2)) for _ in range(max(12, size // 3))]
    family_names = [names.word((2,)) for _ in range(max(8, size // 6))]
    english_names = rng.sample([f"{given} {family}" for given in given_names for family in family_names], size)
    people = [
        Entity(
            "person",
            english_name,
            names.han(_GIVEN, 2, prefixes=_SURNAMES),
            {
                "birthplace": rng.choice(place_names),
                "job": rng.choice(JOBS),
                "favourite colour": rng.choice(COLOURS),
                "birth year": (str(rng.choice(BIRTH_YEARS)),) * 2,
            },
        )
        for english_name in english_names
    ]
    things = [
        Entity(
            "thing",
            names.word((2,)),
            names.han(_THING_CHARS, 2),
            {"kind": rng.choice(THING_KINDS), "colour": rng.choice(COLOURS), "origin": rng.choice(place_names)},
        )
        for _ in range(max(6, size // 5))
    ]

    sft_entities, heldout_entities = [], []
    for group in (people, places, things):
        order = list(group)
        rng.shuffle(order)
        sft_entities += order[: len(order) // 2]
        heldout_entities += order[len(order) // 2 :]

    entities = people + places + things
    candidates = {}
    for entity in entities:
        for attribute, (english, chinese) in entity.facts.items():
            pools = candidates.setdefault((entity.kind, attribute), {"en": [], "zh": []})
            for language, value in (("en", english), ("zh", chinese)):
                if value not in pools[language]:
                    pools[language].append(value)
    return World(seed, entities, sft_entities, heldout_entities, bio_copies, faq_copies, candidates)

"""The words a semantic cache hit must not change: numbers, units, negations, ordering and
direction words, operators, names.

Sentence embeddings barely move when one of these changes: MiniLM puts "Is a 5 mg dose
safe?" and "Is a 50 mg dose safe?" at cosine 0.971, "Sort ascending" and "Sort descending"
at 0.965, "Delete the files" and "Do not delete the files" at 0.964, a flight from Paris to
London and one from London to Paris at 0.996. So L2 compares, besides the cosine, the
*critical tokens* of the new and the cached question, in order, and any difference is a
miss. Each token is written in one canonical spelling, so paraphrases still match:

- numbers, with their spelling normalised: `1,000` = `1000` = `1000.0` = `one thousand`,
  `3e-4` = `0.0003`, `15%` = `15 percent`; ordinals `3rd` = `third` = 3;
- units and currencies: `mg` = `milligrams`, `USD` = `$` = `dollars`, `°C` = `Celsius`;
  short ones that are also words (`s`, `m`, `g`, `min`, `second`, `am`, `pm`) only right
  after a number;
- negations: not, no, never, none, nothing, without, except, cannot, every `n't` contraction
  (with or without the apostrophe: `dont`), each with the next two content words, so moving
  a negation from one verb to another is a difference too;
- ordering, direction and other polar words, one label per pole: ascending = increasing,
  largest = maximum = top, before = earlier, above = more = greater, first, last, left,
  enable, delete = remove, allow, buy, encrypt, upload, good / bad, fast / slow, yesterday /
  tomorrow, only, all, ...; adjectives and their prefixed opposites (secure / insecure,
  signed / unsigned, blocking / non-blocking);
- operators: `+` = plus, `-` = minus, `*` = times, `/`, `^`, `<`, `>`, square root; and
  what `than` compares with ("cats smarter than dogs" is not "dogs smarter than cats");
- names: a capitalised word that does not start a sentence (`Paris`, `July`, `French`), and
  languages and formats typed in lower case (`python`, `json`, `spanish`), weekdays and
  months (`sunday`), common animals (`dog`, `cat`);
- patient groups (child = infant = kids, teen, adult, elderly, pregnant), empty / full;
- code, verbatim: paths, file names, identifiers, flags, URLs, addresses (`/etc`,
  `config.yaml`, `my_table`, `--force`, `bob@example.com`);
- grammatical persons in order of first mention when two or more take part ("Should I sue
  him?" is not "Should he sue me?"); one alone is phrasing ("Can you explain ...").

Within each kind (numbers, units, negations, names, code, persons, the rest) the order counts: "Is 3 more
than 5?" is not "Is 5 more than 3?", "USD to EUR" not "EUR to USD"; across kinds it does
not, so "sort descending: 3, 1, 2" still matches "sort 3, 1, 2 in descending order".

A miss costs one generation; a wrong hit serves another question's answer, so the rules
lean strict. tests/data/semantic_cache_pairs.json holds the paraphrases and adversarial
pairs the hit rates in docs/serving.md were measured on.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal
from typing import NamedTuple

WINDOW = 2  # content words that follow a negation and go into its token

NEGATIONS = {"not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor",
             "without", "cannot", "except", "excluding", "avoid", "unless", "lacking", "non"}

# adjectives whose prefixed form is their opposite: each form is critical, "unsafe" != "safe"
NEGATABLE = set("""able accessible accurate active appropriate authenticated authorized available
    balanced blocking capable certain checked clear common comfortable compatible complete
    consistent conscious convenient correct dependent direct efficient effective encrypted equal
    ethical expected fair finished flexible formal friendly happy healthy honest important known
    legal likely limited logical lucky mature mobile moral mutable natural necessary normal
    official ordered paid patient perfect pleasant polite popular possible practical predictable
    probable proper rational reasonable regular related relevant reliable resistant responsible
    safe secure sensitive signed sorted stable successful sufficient supported tolerant true used
    usual valid visible wanted wise""".split())
NEGATING_PREFIXES = ("non", "un", "in", "im", "il", "ir", "dis")

# names users type in lower case: programming languages, formats, human languages
LEXICON = set("""python java javascript typescript rust ruby php perl kotlin swift scala haskell
    golang cpp csharp matlab julia lua bash zsh powershell sql sqlite postgres postgresql mysql
    mongodb redis json yaml toml xml csv html css markdown latex pdf docx xlsx png jpeg jpg svg
    linux windows macos ios android numpy pandas pytorch tensorflow react vue angular django
    flask english french german spanish italian portuguese chinese mandarin japanese korean
    russian arabic hindi dutch swedish polish turkish greek hebrew latin
    january february march april june july august september october november december
    monday tuesday wednesday thursday friday saturday sunday
    dog dogs puppy puppies cat cats kitten kittens horse horses cow cows pig pigs rabbit rabbits
    bird birds parrot parrots fish hamster hamsters""".split())  # "may": also a verb
NT_WORDS = {"dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "couldnt",
            "shouldnt", "wouldnt", "wont", "hasnt", "havent", "hadnt", "mustnt", "neednt", "aint"}

# polar words: word -> label; synonyms share a label, opposite poles differ
_POLES = {
    "dir:up": "ascending asc increasing increase increases increased increment rising rise up upward upwards",
    "dir:down": "descending desc decreasing decrease decreases decreased decrement falling fall down "
                "downward downwards",
    "dir:reverse": "reverse reversed backwards backward",
    "dir:forward": "forward forwards",
    "ext:max": "max maximum maximal maximise maximize largest biggest highest greatest most top",
    "ext:min": "min minimum minimal minimise minimize smallest lowest least fewest bottom",
    "cmp:gt": "more greater larger bigger higher above over exceed exceeds exceeding upper heavier "
              "longer taller wider",
    "cmp:lt": "less fewer smaller lower below under beneath lighter shorter narrower",
    "time:before": "before earlier prior previous preceding until till",
    "time:after": "after later following next subsequent",
    "pos:first": "first earliest initial leading",
    "pos:last": "last final latest trailing",
    "age:old": "old older oldest",
    "age:young": "young younger youngest newer newest",
    "side:left": "left", "side:right": "right",
    "side:north": "north northern", "side:south": "south southern",
    "side:east": "east eastern", "side:west": "west western",
    "side:in": "inside inner internal interior incoming inbound",
    "side:out": "outside outer external exterior outgoing outbound",
    "case:upper": "uppercase", "case:lower": "lowercase",
    "sw:on": "enable enabled enabling activate activated",
    "sw:off": "disable disabled disabling deactivate deactivated",
    "run:start": "start starts started starting launch resume",
    "run:stop": "stop stops stopped stopping halt pause kill",
    "open:open": "open opened opening unlock unlocked",
    "open:close": "close closed closing lock locked",
    "set:add": "add adds added adding insert inserted append appended include includes included "
               "including create",
    "set:del": "delete deletes deleted deleting remove removes removed removing erase drop exclude "
               "excludes excluded discard destroy",
    "tf:true": "true yes correct valid", "tf:false": "false incorrect invalid wrong",
    "perm:allow": "allow allowed allows permit permitted accept accepted grant approve whitelist "
                  "allowlist",
    "perm:deny": "deny denied denies forbid forbidden reject rejected refuse block blocked ban "
                 "disallow blacklist blocklist revoke",
    "trade:buy": "buy buying bought purchase", "trade:sell": "sell selling sold",
    "io:import": "import imports", "io:export": "export exports",
    "io:upload": "upload uploads uploading", "io:download": "download downloads downloading",
    "io:push": "push", "io:pull": "pull",
    "crypt:enc": "encrypt encrypted encryption encode encoded encoding compress compressed zip",
    "crypt:dec": "decrypt decrypted decryption decode decoded decoding decompress decompressed unzip",
    "inst:in": "install installed installing", "inst:out": "uninstall uninstalled uninstalling",
    "conn:in": "connect connected login", "conn:out": "disconnect disconnected logout",
    "sub:in": "subscribe subscribed", "sub:out": "unsubscribe unsubscribed",
    "win:win": "win wins won gain gains profit", "win:lose": "lose loses lost loss losses",
    "safe:yes": "safe safely harmless", "safe:no": "unsafe dangerous harmful risky",
    "poss:yes": "possible", "poss:no": "impossible",
    "legal:yes": "legal lawful", "legal:no": "illegal unlawful",
    "likely:yes": "likely probable", "likely:no": "unlikely improbable",
    "health:yes": "healthy", "health:no": "unhealthy",
    "sign:pos": "positive", "sign:neg": "negative",
    "freq:always": "always", "freq:often": "usually often frequently mostly",
    "freq:some": "sometimes occasionally", "freq:rare": "rarely seldom hardly barely scarcely",
    "q:all": "all every each both", "q:some": "some", "q:only": "only solely exclusively",
    "day:yesterday": "yesterday", "day:today": "today tonight", "day:tomorrow": "tomorrow",
    "era:past": "past", "era:future": "future",
    "tod:morning": "morning", "tod:afternoon": "afternoon", "tod:evening": "evening",
    "tod:night": "night",
    "q:good": "good great", "q:bad": "bad badly poor", "q:better": "better",
    "q:worse": "worse", "q:best": "best", "q:worst": "worst",
    "pro:pro": "pros advantages advantage benefits benefit upsides",
    "pro:con": "cons disadvantages disadvantage drawbacks drawback downsides risks",
    "temp:hot": "hot warm warmer hotter", "temp:cold": "cold cool cooler colder",
    "speed:fast": "fast faster fastest quick quickly", "speed:slow": "slow slower slowest slowly",
    "cost:cheap": "cheap cheaper cheapest inexpensive", "cost:dear": "expensive costly pricey",
    "ease:easy": "easy easier easiest simple", "ease:hard": "hard harder hardest difficult",
    "force:strong": "strong stronger strongest", "force:weak": "weak weaker weakest",
    "lvl:high": "high", "lvl:low": "low",
    "len:short": "short brief briefly concise concisely succinct",
    "len:long": "long detailed elaborate thorough thoroughly lengthy",
    "sex:male": "male men man boy boys", "sex:female": "female women woman girl girls",
    "vis:public": "public", "vis:private": "private",
    "fill:empty": "empty", "fill:full": "full",
    "do:undo": "undo", "do:redo": "redo",
    "who:child": "child children kid kids infant infants baby babies toddler toddlers newborn "
                 "newborns paediatric pediatric",
    "who:teen": "teen teens teenager teenagers adolescent adolescents",
    "who:adult": "adult adults grown-up grown-ups",
    "who:elderly": "elderly senior seniors geriatric",
    "who:pregnant": "pregnant pregnancy", "who:nursing": "breastfeeding lactating",
    "sync:sync": "sync synchronous synchronously", "sync:async": "async asynchronous asynchronously",
    "op:+": "plus sum", "op:-": "minus subtract subtracted", "op:*": "times multiply multiplied",
    "op:/": "divide divided quotient", "op:^": "power squared cubed", "op:sqrt": "sqrt root",
}
POLAR = {w: label for label, words in _POLES.items() for w in words.split()}
# who does what to whom: "Should I sue him?" is not "Should he sue me?" (cosine 0.966)
_PERSONS = {"per:i": "i me my mine myself", "per:you": "you your yours yourself yourselves",
            "per:he": "he him his himself", "per:she": "she her hers herself",
            "per:we": "we us our ours ourselves", "per:they": "they them their theirs themselves"}
PERSONS = {w: label for label, words in _PERSONS.items() for w in words.split()}

SYMBOLS = {"+": "op:+", "-": "op:-", "−": "op:-", "*": "op:*", "×": "op:*", "/": "op:/",
           "÷": "op:/", "^": "op:^", "<": "cmp:lt", ">": "cmp:gt", "≤": "cmp:le", "≥": "cmp:ge",
           "≠": "cmp:ne", "=": "cmp:eq", "√": "op:sqrt", "%": "unit:%", "$": "unit:usd",
           "€": "unit:eur", "£": "unit:gbp", "¥": "unit:jpy", "₹": "unit:inr", "°": "unit:deg"}

CURRENCY = {"$", "€", "£", "¥", "₹"}
SWITCH_VERBS = {"turn", "turns", "turned", "turning", "switch", "switched", "switching", "power",
                "powered", "toggle", "toggled", "log", "logged", "sign", "signed"}
KINDS = ("num", "unit", "not", "name", "word", "code", "per")

# units: always critical (strong), or only right after a number (weak: also a plain word)
_UNITS = {
    "mg": "mg milligram milligrams milligramme", "g": "gram grams gramme grammes",
    "kg": "kg kilogram kilograms kilo kilos", "ug": "ug μg mcg microgram micrograms",
    "lb": "lb lbs pound pounds", "oz": "oz ounce ounces", "t": "ton tons tonne tonnes",
    "ml": "ml milliliter milliliters millilitre millilitres", "l": "liter liters litre litres",
    "gal": "gal gallon gallons", "mm": "mm millimeter millimeters millimetre millimetres",
    "cm": "cm centimeter centimeters centimetre centimetres", "m": "meter meters metre metres",
    "km": "km kilometer kilometers kilometre kilometres", "mi": "mi mile miles",
    "ft": "ft foot feet", "inch": "inch inches", "yd": "yd yard yards",
    "ms": "ms millisecond milliseconds", "s": "sec secs seconds",
    "min": "mins minute minutes", "h": "hr hrs hour hours hourly", "day": "day days daily",
    "week": "week weeks weekly", "month": "month months monthly",
    "year": "year years yr yrs yearly annually annual",
    "c": "celsius centigrade", "f": "fahrenheit", "k": "kelvin", "deg": "degree degrees",
    "%": "percent percentage pct", "usd": "usd dollar dollars", "eur": "eur euro euros",
    "gbp": "gbp sterling", "jpy": "jpy yen", "cny": "cny yuan rmb", "inr": "inr rupee rupees",
    "cad": "cad", "aud": "aud", "chf": "chf franc francs", "btc": "btc bitcoin bitcoins",
    "eth": "eth ether", "b": "byte bytes", "bit": "bit bits", "kb": "kb kilobyte kilobytes",
    "mb": "mb megabyte megabytes", "gb": "gb gigabyte gigabytes", "tb": "tb terabyte terabytes",
    "kib": "kib", "mib": "mib", "gib": "gib", "tib": "tib", "hz": "hz hertz", "khz": "khz",
    "mhz": "mhz", "ghz": "ghz", "w": "watt watts", "kw": "kw kilowatt kilowatts", "kwh": "kwh",
    "v": "volt volts", "a": "amp amps ampere amperes", "mph": "mph", "kmh": "kmh kph",
    "cal": "cal calorie calories kcal", "mmol": "mmol", "iu": "iu",
}
UNITS = {w: f"unit:{u}" for u, words in _UNITS.items() for w in words.split()}
WEAK_UNITS = {"s": "unit:s", "second": "unit:s", "m": "unit:m", "g": "unit:g", "l": "unit:l",
              "min": "unit:min", "t": "unit:t", "am": "time:am", "pm": "time:pm",
              "h": "unit:h", "k": "unit:k", "b": "unit:b",
              "c": "unit:c", "f": "unit:f", "v": "unit:v", "w": "unit:w", "x": "op:*"}

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
        "fifteen sixteen seventeen eighteen nineteen".split()
NUMBER_WORDS = {w: i for i, w in enumerate(_ONES)}
NUMBER_WORDS.update({w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})
NUMBER_WORDS.update(dozen=12)
SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
ORDINALS = {w: i for i, w in enumerate("third fourth fifth sixth seventh eighth ninth tenth "
                                       "eleventh twelfth".split(), 3)}
ORDINALS.update(half=Decimal("0.5"), quarter=Decimal("0.25"))

# skipped when picking the words a negation governs
STOP = {"a", "an", "the", "to", "do", "does", "did", "be", "is", "are", "was", "were", "been",
        "being", "ever", "any", "it", "its", "this", "that", "these", "those", "i", "you", "we",
        "they", "he", "she", "me", "us", "them", "my", "your", "our", "their", "please", "should",
        "will", "would", "can", "could", "must", "may", "might", "have", "has", "had", "of",
        "for", "in", "on", "at", "with", "just", "really", "even", "also", "so", "then", "and",
        "or", "but", "if", "as", "by", "from", "into", "there", "here", "yet", "still"}

_TOKEN = re.compile(r"""
    (?P<num>\d+(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d*\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
  | (?P<word>[^\W\d_]+(?:'[^\W\d_]+)*)
  | (?P<sym>[+\-*×/÷^<>≤≥≠=√%$€£¥₹°])
  | (?P<end>[.!?;:\n]+)
""", re.VERBOSE)


_CODE = re.compile(r"\w[_/\\.:@=#]\w|^[/~\\]\w|^--?[^\W\d]|`|\*\*|_|\w\(|\w\[|::|->|=>|==")
_NUMERIC = re.compile(r"[\d.,:/eE+\-%$€£]+")
_ABBREVIATION = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]?")
_CODE_STRIP = ".,;:!?()[]{}<>\"'“”‘’«»"


def _units_per(chunk: str) -> bool:
    """km/s, mg/kg: units, read as such by the unit rules."""
    parts = chunk.lower().split("/")
    return len(parts) > 1 and all(p in UNITS or p in WEAK_UNITS or p in _UNITS for p in parts)


class Token(NamedTuple):
    kind: str      # num | word | sym
    value: str     # canonical: a number's normal form, a word lower-cased
    raw: str
    start: bool    # first of its sentence
    glued: bool    # no space before it (a unit on its number, a dash inside a word)


def signature(text: str) -> tuple[tuple[str, ...], ...]:
    """The critical tokens of `text` in canonical spelling, in order within each kind
    (numbers, units, negations, names, other words): "Sort descending: 3, 1, 2" and "Sort
    3, 1, 2 in descending order" match, "Is 3 greater than 5?" and "Is 5 greater than 3?"
    do not."""
    flat = _flat(text) + _code(text)
    flat = [t for t in flat if not t.startswith("per:")] + _persons(flat)
    return tuple(tuple(t for t in flat if _kind(t) == kind) for kind in KINDS)


def _persons(flat: list[str]) -> list[str]:
    """The grammatical persons in order of first mention, when at least two take part
    ("I ... him" vs "he ... me"); one person alone ("Can you explain", "my iPhone") is
    how a paraphrase is phrased, not what it asks."""
    seen = list(dict.fromkeys(t for t in flat if t.startswith("per:")))
    return seen if len(seen) >= 2 else []


def _code(text: str) -> list[str]:
    """Paths, file names, identifiers, flags, URLs and addresses, verbatim: `my_table` and
    `your_table` embed at cosine 0.991, `/etc` and `/home` at 0.894, and a hit there serves
    an answer about another object. Plain numbers (3/4, 9:30, 2.5) are left to `num`,
    abbreviations (e.g., U.S.) are not code."""
    out = []
    for chunk in unicodedata.normalize("NFKC", text).split():
        chunk = chunk.strip(_CODE_STRIP)
        if (chunk and _CODE.search(chunk) and not _NUMERIC.fullmatch(chunk)
                and not _ABBREVIATION.fullmatch(chunk) and not _units_per(chunk)):
            out.append(f"code:{chunk}")
    return out


def _kind(token: str) -> str:
    kind = token.split(":", 1)[0]
    return kind if kind in KINDS else "word"


def _flat(text: str) -> list[str]:
    toks = _tokens(text)
    out: list[str] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.kind == "num":
            value, i = _number(toks, i)
            out.append(f"num:{value}")
            continue
        if t.kind == "sym":
            if t.value in CURRENCY and i + 1 < len(toks) and toks[i + 1].kind == "num":
                value, i = _number(toks, i + 1)  # $100 = 100 dollars
                out += [f"num:{value}", SYMBOLS[t.value]]
                continue
            if t.value == "-" and _negative(toks, i):
                value, i = _number(toks, i + 1)  # -5: a number of its own, not 5 with a minus
                out.append(f"num:-{value}")
                continue
            if t.value != "-" or _minus(toks, i):
                out.append(SYMBOLS[t.value])
        elif (run := _number_words(toks, i)) is not None:
            value, i = run
            out.append(f"num:{_canonical(value)}")
            continue
        else:
            out.extend(_word(toks, i))
        i += 1
    # "25 °C" = "25 degrees Celsius" = "25 C": the scale says it all
    return [t for j, t in enumerate(out)
            if not (t == "unit:deg" and out[j + 1:j + 2] in (["unit:c"], ["unit:f"], ["unit:k"]))]


def same(a: str, b: str) -> bool:
    return signature(a) == signature(b)


def _tokens(text: str) -> list[Token]:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2212", "-")
    out, start, end = [], True, -1
    for m in _TOKEN.finditer(text):
        kind, raw = m.lastgroup, m.group()
        if kind == "end":
            start, end = True, m.end()
            continue
        value = raw.lower() if kind == "word" else raw
        out.append(Token(kind, value, raw, start, m.start() == end))
        start, end = False, m.end()
    return out


def _canonical(d) -> str:
    """One spelling per value: 5 = 5.0 = 5e0, 0.50 = .5; exact however many digits (no
    rounding to a context's precision), and never expanded past 30 digits (1e999999999
    stays short)."""
    d = Decimal(d)
    if not d.is_finite():
        return str(d)
    sign, digits, exp = d.as_tuple()
    digits = "".join(map(str, digits)).lstrip("0") or "0"
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    d = Decimal((sign, tuple(map(int, stripped)), exp if stripped != "0" else 0))
    if -30 <= d.adjusted() <= 30 and len(stripped) <= 60:
        return format(d, "f")
    return str(d)


def _number(toks: list[Token], i: int) -> tuple[str, int]:
    """A numeral, times a scale word after it ('5 million'); the index after them."""
    value = Decimal(toks[i].value.replace(",", ""))
    i += 1
    if i < len(toks) and toks[i].kind == "word" and toks[i].value in SCALES:
        value *= SCALES[toks[i].value]
        i += 1
    return _canonical(value), i


def _negative(toks: list[Token], i: int) -> bool:
    """'-' glued to the number after it and not to a token before it (-5, 5 - -3)."""
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    if nxt is None or nxt.kind != "num" or not nxt.glued:
        return False
    return i == 0 or not toks[i].glued or toks[i - 1].kind == "sym"


def _minus(toks: list[Token], i: int) -> bool:
    """A '-' is minus next to a number or standing alone, not a hyphen inside a word
    (two-factor, big-O)."""
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    if toks[i].glued and i > 0 and toks[i - 1].kind == "word":
        return False
    return not (nxt is not None and nxt.glued and nxt.kind == "word")


def _number_words(toks: list[Token], i: int):
    """Number words from i on as one value ('twenty five', 'a hundred', 'third') and the
    index after them, or None. A lone 'one' is left alone (which one, one of them)."""
    if toks[i].value in ORDINALS:
        return ORDINALS[toks[i].value], i + 1
    words, j = [], i
    while j < len(toks) and toks[j].kind == "word":
        w = toks[j].value
        if w in NUMBER_WORDS or w in SCALES:
            words.append(w)
        elif not (w == "and" and words and j + 1 < len(toks) and toks[j + 1].value in NUMBER_WORDS):
            break
        j += 1
    if not words or words == ["one"]:
        return None
    total, current = 0, 0
    for w in words:
        if w in SCALES:
            current = max(current, 1) * SCALES[w]
            if SCALES[w] >= 1000:
                total, current = total + current, 0
        else:
            current += NUMBER_WORDS[w]
    return total + current, j


def _word(toks: list[Token], i: int) -> list[str]:
    t = toks[i]
    w = t.value
    if w == "than":  # what is compared with: "cats smarter than dogs" != "dogs ... than cats"
        return [f"than:{'|'.join(_content(toks[i + 1:], 1))}"]
    if w in ("vs", "versus"):
        return [f"vs:{'|'.join(_content(reversed(toks[:i]), 1) + _content(toks[i + 1:], 1))}"]
    if w == "off" or (w == "on" and i > 0 and toks[i - 1].value in SWITCH_VERBS):
        return ["sw:off" if w == "off" else "sw:on"]
    after_number = i > 0 and (toks[i - 1].kind == "num" or (toks[i - 1].value == "°" and t.glued))
    if w.endswith("n't") or w in NT_WORDS or w in NEGATIONS:
        return [_negation(toks, i)]
    if after_number and w in ("st", "nd", "rd", "th"):
        return []  # 3rd: the number is already there
    if after_number and w in WEAK_UNITS:
        return [WEAK_UNITS[w]]
    if w in UNITS:
        return [UNITS[w]]
    if w in PERSONS and not (len(t.raw) > 1 and t.raw.isupper()):   # "US" is a country
        return [PERSONS[w]]
    if w in POLAR:
        return [POLAR[w]]
    if w in NEGATABLE:
        return [f"adj:{w}"]
    for prefix in NEGATING_PREFIXES:
        if w.startswith(prefix) and w[len(prefix):] in NEGATABLE:
            return [f"adj:not-{w[len(prefix):]}"]
    base = w[:-2] if w.endswith("'s") else w
    if base in LEXICON:
        return [f"name:{base}"]
    if not t.start and t.raw[:1].isupper() and base not in ("i", "i'm", "i'd", "i've", "i'll"):
        return [f"name:{base}"]
    return []


def _negation(toks: list[Token], i: int) -> str:
    """'not' with the next WINDOW content words."""
    return "not:" + "|".join(_content(toks[i + 1:], WINDOW))


def _content(toks, n: int) -> list[str]:
    """The first n content words (not in STOP) of toks, polar and unit words by their label."""
    out = []
    for t in toks:
        if len(out) == n:
            break
        if t.kind == "word" and t.value not in STOP:
            w = t.value[:-2] if t.value.endswith("'s") else t.value
            out.append(POLAR.get(w) or UNITS.get(w) or w)
    return out

"""Machine translation between any two languages, named the way people name them ("fr", "fra",
"French", "français", "pt-BR", "中文").

The source language, when not given, is guessed by a small heuristic: the writing system first
(Han, kana, Hangul, Cyrillic, Arabic, ...), then, for Latin and Cyrillic text, function words and
letters peculiar to each language. It is right on ordinary sentences and can be wrong on a few words.
Long input is split into sentences (line breaks kept), which are translated in batches and joined
back. Replies are cleaned to the translation alone: no "Here is the translation:", no quotes, no notes.

Evaluation: sacreBLEU's corpus BLEU and chrF, with their signatures, per language pair and overall.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import unicodedata
from collections.abc import Sequence

from qwenkit.errors import UserError
from qwenkit.generate import SamplingParams
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks import metrics
from qwenkit.tasks.base import Context, GenerativeTask, Messages, chat
from qwenkit.tasks.hygiene import strip_preamble, strip_special_tokens
from qwenkit.tokenizer import Tokenizer

# code: (English name, other names and codes people use: ISO 639-2/3, native names)
LANGUAGES: dict[str, tuple[str, ...]] = {
    "en": ("English", "eng", "anglais", "englisch", "inglés", "inglese", "英语", "英文"),
    "fr": ("French", "fra", "fre", "français", "francais", "französisch", "francés", "法语", "法文"),
    "de": ("German", "deu", "ger", "deutsch", "allemand", "alemán", "tedesco", "德语", "德文"),
    "es": ("Spanish", "spa", "español", "espanol", "castellano", "espagnol", "spanisch", "西班牙语"),
    "it": ("Italian", "ita", "italiano", "italien", "italienisch", "意大利语"),
    "pt": ("Portuguese", "por", "português", "portugues", "portugais", "葡萄牙语"),
    "nl": ("Dutch", "nld", "dut", "nederlands", "flemish", "néerlandais", "荷兰语"),
    "sv": ("Swedish", "swe", "svenska"),
    "da": ("Danish", "dan", "dansk"),
    "no": ("Norwegian", "nor", "nob", "nb", "norsk", "bokmål"),
    "fi": ("Finnish", "fin", "suomi"),
    "is": ("Icelandic", "isl", "ice", "íslenska"),
    "pl": ("Polish", "pol", "polski"),
    "cs": ("Czech", "ces", "cze", "čeština", "cestina"),
    "sk": ("Slovak", "slk", "slo", "slovenčina"),
    "sl": ("Slovenian", "slv", "slovene", "slovenščina"),
    "hr": ("Croatian", "hrv", "hrvatski"),
    "sr": ("Serbian", "srp", "српски", "srpski"),
    "bg": ("Bulgarian", "bul", "български"),
    "ro": ("Romanian", "ron", "rum", "română", "romana"),
    "hu": ("Hungarian", "hun", "magyar"),
    "et": ("Estonian", "est", "eesti"),
    "lv": ("Latvian", "lav", "latviešu"),
    "lt": ("Lithuanian", "lit", "lietuvių"),
    "el": ("Greek", "ell", "gre", "ελληνικά"),
    "ru": ("Russian", "rus", "русский", "russe", "russisch", "俄语"),
    "uk": ("Ukrainian", "ukr", "українська"),
    "tr": ("Turkish", "tur", "türkçe", "turkce"),
    "ar": ("Arabic", "ara", "العربية", "arabe", "阿拉伯语"),
    "he": ("Hebrew", "heb", "iw", "עברית"),
    "fa": ("Persian", "fas", "per", "farsi", "فارسی"),
    "ur": ("Urdu", "urd", "اردو"),
    "hi": ("Hindi", "hin", "हिन्दी", "हिंदी"),
    "bn": ("Bengali", "ben", "bangla", "বাংলা"),
    "ta": ("Tamil", "tam", "தமிழ்"),
    "th": ("Thai", "tha", "ไทย"),
    "vi": ("Vietnamese", "vie", "tiếng việt", "tieng viet"),
    "id": ("Indonesian", "ind", "bahasa indonesia", "indonesia"),
    "ms": ("Malay", "msa", "may", "bahasa melayu", "melayu"),
    "tl": ("Tagalog", "tgl", "filipino", "fil"),
    "sw": ("Swahili", "swa", "kiswahili"),
    "ca": ("Catalan", "cat", "català"),
    "eu": ("Basque", "eus", "baq", "euskara"),
    "gl": ("Galician", "glg", "galego"),
    "ga": ("Irish", "gle", "gaeilge"),
    "cy": ("Welsh", "cym", "wel", "cymraeg"),
    "la": ("Latin", "lat", "latina"),
    "ka": ("Georgian", "kat", "geo", "ქართული"),
    "hy": ("Armenian", "hye", "arm", "հայերեն"),
    "zh": (
        "Chinese",
        "zho",
        "chi",
        "mandarin",
        "中文",
        "汉语",
        "漢語",
        "简体中文",
        "simplified chinese",
        "zh-cn",
        "zh-hans",
        "zh-sg",
        "chinois",
        "chinesisch",
    ),
    "zh-Hant": ("Traditional Chinese", "zh-tw", "zh-hk", "zh-mo", "繁體中文", "繁体中文", "cantonese", "yue"),
    "ja": ("Japanese", "jpn", "日本語", "japonais", "japanisch", "日语"),
    "ko": ("Korean", "kor", "한국어", "coréen", "koreanisch", "韩语"),
}
REGIONAL = {
    "pt-br": ("pt-BR", "Brazilian Portuguese"),
    "pt-pt": ("pt-PT", "European Portuguese"),
    "es-mx": ("es-MX", "Mexican Spanish"),
    "fr-ca": ("fr-CA", "Canadian French"),
}

_NAMES: dict[str, str] = {}
for _code, (_name, *_aliases) in LANGUAGES.items():
    for _key in (_code, _name, *_aliases):
        _NAMES[_key.lower()] = _code

# Where words are not separated by spaces, sentences are joined without one.
NO_SPACE = {"zh", "zh-Hant", "ja", "th"}


def resolve_language(name: str) -> tuple[str, str]:
    """(code, English name) of a language as people write it: a code ("fr", "fra", "pt-BR", "zh_TW"),
    an English name, or the language's own name. Raises UserError with suggestions otherwise."""
    key = " ".join(name.strip().lower().replace("_", "-").split())
    if key in REGIONAL:
        return REGIONAL[key]
    for candidate in (key, key.split("-")[0], key.removesuffix(" language")):
        if candidate in _NAMES:
            code = _NAMES[candidate]
            return code, LANGUAGES[code][0]
    close = difflib.get_close_matches(key, list(_NAMES), n=3, cutoff=0.75)
    hint = (
        f"; did you mean {', '.join(repr(c) for c in close)}?"
        if close
        else "; use a code like fr or a name like French"
    )
    raise UserError(f"unknown language {name!r}{hint}")


# ---- source-language detection ------------------------------------------------------------------------

_STOPWORDS = {
    "en": "the and is are was were of to in that it for with on this you not be have has from at by an or but",
    "fr": "le la les et est sont un une des du de que qui pas pour dans sur avec ce cette il elle nous vous je au",
    "de": "der die das und ist sind ein eine nicht mit von zu den dem des auf für ich sie wir es im auch wie",
    "es": "el la los las y es son un una de que no por para con en del se lo su al como pero muy está",
    "it": "il lo la gli le e è sono un una di che non per con del della si in ma come anche molto questo",
    "pt": "o a os as e é são um uma de que não para com do da em no na se por mas como muito está você",
    "nl": "de het een en is zijn van dat niet met op voor te in ik je we ze maar ook als dit er",
    "sv": "och är att en ett det som inte för med på av till jag du vi de han hon om men",
    "da": "og er at en et det som ikke for med på af til jeg du vi de han hun har men",
    "no": "og er at en et det som ikke for med på av til jeg du vi de han hun har men",
    "fi": "ja on ei se että en ole mutta kun niin tämä hän me te he oli ovat",
    "pl": "i w na jest nie się że to z do jak ale są o dla czy tak jego bardzo",
    "cs": "a je na se že to v ve s z do jak ale jsou o pro by tak jeho velmi",
    "ro": "și este sunt un o de la în că nu pe cu din pentru care mai dar",
    "hu": "a az és hogy nem is egy van ez de meg csak már mint volt",
    "tr": "ve bir bu da de ne için ile çok daha ama gibi var ben sen o",
    "id": "dan yang di ini itu dengan untuk tidak dari ke ada saya kami akan juga",
    "vi": "và là của có không một những được cho này người trong với các",
    "ca": "el la els les i és són un una de que no per amb del es en als",
    "ru": "и в не на что он она это как по но из у за от так же был для",
    "uk": "і в не на що він вона це як по але з у за від так же був для",
    "bg": "и в не на че той тя това как по но от за са се да е",
}
_STOPSETS = {code: set(words.split()) for code, words in _STOPWORDS.items()}
# The accented letters of each language's alphabet (a letter outside it counts against the language),
# and the few that mark one language (or two) among its neighbours.
_ALPHABET = {
    "en": "",
    "fr": "àâæçéèêëîïôœùûüÿ",
    "de": "äöüß",
    "es": "áéíñóúü",
    "it": "àèéìíîòóùú",
    "pt": "áâãàçéêíóôõú",
    "nl": "éèëïöü",
    "sv": "åäöé",
    "da": "æøåé",
    "no": "æøåé",
    "fi": "äöå",
    "is": "áðéíóúýþæö",
    "pl": "ąćęłńóśźż",
    "cs": "áčďéěíňóřšťúůýž",
    "ro": "ăâîșțşţ",
    "hu": "áéíóöőúüű",
    "tr": "çğıöşüâî",
    "id": "",
    "vi": "",
    "ca": "àçèéíïòóúü",
}
_MARKERS = {
    "es": "ñ",
    "pt": "ãõ",
    "fr": "œêëîïû",
    "de": "ß",
    "it": "ìò",
    "tr": "ğış",
    "pl": "łąęśźż",
    "cs": "řěů",
    "hu": "őű",
    "ro": "ășț",
    "vi": "ơưđạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ",
    "da": "æø",
    "no": "æø",
    "sv": "å",
    "is": "ðþ",
    "uk": "ієїґ",
    "sr": "ђћџљњј",
    "bg": "ъщ",
}


def _script(ch: str) -> str | None:
    o = ord(ch)
    if 0x3040 <= o <= 0x30FF:
        return "kana"
    if 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF:
        return "hangul"
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
        return "han"
    for lo, hi, name in (
        (0x0400, 0x04FF, "cyrillic"),
        (0x0600, 0x06FF, "arabic"),
        (0x0590, 0x05FF, "hebrew"),
        (0x0370, 0x03FF, "greek"),
        (0x0E00, 0x0E7F, "thai"),
        (0x0900, 0x097F, "devanagari"),
        (0x0980, 0x09FF, "bengali"),
        (0x0B80, 0x0BFF, "tamil"),
        (0x10A0, 0x10FF, "georgian"),
        (0x0530, 0x058F, "armenian"),
    ):
        if lo <= o <= hi:
            return name
    if ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
        return "latin"
    return None


def detect_language(text: str) -> str:
    """A guess at the language of a text, as a code (see the module docstring); "en" when unsure."""
    scripts: dict[str, int] = {}
    for ch in text:
        s = _script(ch)
        if s:
            scripts[s] = scripts.get(s, 0) + 1
    if not scripts:
        return "en"
    if scripts.get("kana"):
        return "ja"  # Japanese mixes kana with Han; Chinese has no kana
    main = max(scripts, key=scripts.get)
    simple = {
        "hangul": "ko",
        "han": "zh",
        "hebrew": "he",
        "greek": "el",
        "thai": "th",
        "devanagari": "hi",
        "bengali": "bn",
        "tamil": "ta",
        "georgian": "ka",
        "armenian": "hy",
    }
    if main in simple:
        return simple[main]
    lower = text.lower()
    if main == "arabic":
        if any(c in lower for c in "ٹڈڑںے"):
            return "ur"
        return "fa" if any(c in lower for c in "پچژگ") else "ar"
    words = re.findall(r"\w+", lower)
    letters = set(lower)
    if main == "cyrillic":
        candidates: tuple[str, ...] = ("ru", "uk", "bg", "sr")
        accented: set[str] = set()
    else:
        candidates = tuple(_ALPHABET)
        accented = {c for c in letters if c.isalpha() and not c.isascii() and _script(c) == "latin"}
    best, best_score = candidates[0], 0.0
    for code in candidates:
        score = sum(w in _STOPSETS.get(code, ()) for w in words)
        score += 2 * len(letters & set(_MARKERS.get(code, "")))
        if code != "vi":
            score -= 2 * len(accented - set(_ALPHABET.get(code, "")))
        if score > best_score:
            best, best_score = code, score
    return best


# ---- splitting ----------------------------------------------------------------------------------------

_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "st",
    "sr",
    "jr",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "no",
    "fig",
    "inc",
    "ltd",
    "co",
    "mt",
    "approx",
    "dept",
    "est",
    "vol",
    "p",
    "pp",
    "m",
    "mme",
    "mlle",
    "hr",
    "fr",
    "z.b",
}
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’»)\]]*\s+|[。！？]+[」』”’）]*\s*")


def split_sentences(text: str) -> list[str]:
    """The sentences of one paragraph: a break after . ! ? … (and 。！？) unless the word before
    the period is a known abbreviation or a single letter (an initial), or the next word starts in
    lower case."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        before = text[start : m.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if m.group().startswith(".") and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        if text[m.end() : m.end() + 1].islower():  # "a.m. on Monday", "Yes… it was": no new sentence
            continue
        sentences.append(text[start : m.end()].strip())
        start = m.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def segment(text: str) -> list[list[str]]:
    """Lines of the text, each as its sentences ([] for a blank line)."""
    return [split_sentences(line) if line.strip() else [] for line in text.splitlines() or [""]]


# ---- prompting and cleaning -----------------------------------------------------------------------------


def build_messages(text: str, target: str, source: str | None = None) -> Messages:
    """The chat for one segment; `target` and `source` are English language names."""
    direction = f"from {source} into {target}" if source else f"into {target}"
    system = (
        f"You are a professional translator. Translate the user's text {direction}, faithfully and "
        f"fluently, keeping its meaning, tone and formatting. Reply with the {target} translation only: "
        f"no introduction, no explanation, no notes, no quotation marks around it, no transliteration."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


_QUOTES = {'"': '"', "“": "”", "«": "»", "„": "“", "「": "」", "『": "』", "'": "'"}
_NOTE = re.compile(
    r"^\s*[(\[]?\s*(note|notes|explanation|translation note|literally|literal translation|"
    r"this (translates|means)|in english|pronunciation|transliteration)\b",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^\s*(translation|translated text|[A-Z][a-z]+( translation)?)\s*:\s*(?=\S)")


def clean_translation(reply: str, source: str) -> str:
    """The translation alone, from a reply that may wrap it in a lead-in, a label, quotes or notes.

    Args:
        reply: the model's reply.
        source: the text that was translated (its own quotes and line breaks are kept).
    """
    text = strip_preamble(reply)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    # Notes after the translation ("Note: ...", "(Literally ...)") go, and so does anything past the
    # first paragraph when the source was a single paragraph.
    while len(paragraphs) > 1 and _NOTE.match(paragraphs[-1]):
        paragraphs.pop()
    if paragraphs and "\n\n" not in source.strip():
        paragraphs = paragraphs[:1]
    text = "\n\n".join(paragraphs).strip()
    lines = text.splitlines()
    if len(lines) > 1 and "\n" not in source.strip() and _NOTE.match(lines[-1]):
        text = "\n".join(lines[:-1]).strip()
    label = _LABEL.match(text)
    if label and not _LABEL.match(source):
        text = text[label.end() :]
    src = source.strip()
    for _ in range(2):  # "«"La maison"»" has two layers
        if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]) and not src.startswith(text[0]):
            text = text[1:-1].strip()
    return text.strip()


def translate(
    model: QwenForCausalLM,
    tok: Tokenizer,
    texts: Sequence[str],
    target: str,
    params: SamplingParams,
    source: str | Sequence[str | None] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Translate texts, sentence by sentence, all sentences of all texts batched together.

    Args:
        texts: the texts to translate.
        target: the target language (a code or a name).
        params: sampling parameters (greedy is usual).
        source: the source language of every text, or one per text; None to detect it.
        batch_size: sentences translated together.
        progress: show a progress bar.
    """
    target_code, target_name = resolve_language(target)
    sources = list(source) if isinstance(source, (list, tuple)) else [source] * len(texts)
    jobs: list[tuple[int, int, int, str, str]] = []  # (text, line, sentence, sentence text, source name)
    layouts = []
    for t, text in enumerate(texts):
        lines = segment(text)
        layouts.append(lines)
        src = sources[t] or detect_language(text)
        src_name = resolve_language(src)[1]
        for li, sentences in enumerate(lines):
            for si, sentence in enumerate(sentences):
                jobs.append((t, li, si, strip_special_tokens(tok, sentence), src_name))
    # A sentence's translation needs a few times its own tokens, plus room for a lead-in that
    # clean_translation removes; past that a small model only rambles, and each token costs a step.
    longest = max((len(tok.encode(j[3])) for j in jobs), default=0)
    params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, 4 * longest + 64))
    done = chat(
        model,
        tok,
        [build_messages(j[3], target_name, j[4]) for j in jobs],
        params,
        batch_size,
        desc="translating" if progress else None,
    )
    out_lines = [[[""] * len(s) for s in lines] for lines in layouts]
    for (t, li, si, sentence, _), c in zip(jobs, done):
        out_lines[t][li][si] = clean_translation(c.text, sentence)
    joiner = "" if target_code in NO_SPACE else " "
    return ["\n".join(joiner.join(s for s in sentences if s) for sentences in lines) for lines in out_lines]


# ---- evaluation ------------------------------------------------------------------------------------------


def bleu_tokenizer(target: str) -> str:
    """sacreBLEU's recommended tokenizer for a target language: "zh" for Chinese, "char" where words
    are not space-separated (Japanese and Korean would need MeCab, which is not a dependency), else
    its default "13a"."""
    code = resolve_language(target)[0]
    return "zh" if code.startswith("zh") else "char" if code in ("ja", "ko", "th") else "13a"


class TranslateTask(GenerativeTask):
    """Rows hold a `source` text, its `reference` translation, the `tgt_lang` and optionally the
    `src_lang` (detected when absent)."""

    name = "translate"
    required = ("source", "reference", "tgt_lang")
    max_new_tokens = 256  # per sentence; `translate` also caps it at a few times the sentence's tokens

    def build_messages(self, tok: Tokenizer, row: dict) -> Messages:
        """The chat for a row's source as one segment; `predict` sends long sources sentence by
        sentence, each in this same chat."""
        source = row.get("src_lang") or detect_language(row["source"])
        target = resolve_language(row["tgt_lang"])[1]
        return build_messages(strip_special_tokens(tok, row["source"]), target, resolve_language(source)[1])

    def parse(self, reply: str, row: dict) -> dict:
        return {"prediction": clean_translation(reply, row["source"])}

    def predict(
        self, model: QwenForCausalLM, tok: Tokenizer, rows: Sequence[dict], params: SamplingParams, batch_size: int = 8
    ) -> list[dict]:
        """Each row with its `prediction`; rows are grouped by target language and their sentences
        translated in batches."""
        predictions: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row["tgt_lang"], []).append(i)
        for tgt, idx in groups.items():
            texts = translate(
                model,
                tok,
                [rows[i]["source"] for i in idx],
                tgt,
                params,
                [rows[i].get("src_lang") for i in idx],
                batch_size,
                progress=True,
            )
            predictions.update(zip(idx, texts))
        return [{**row, "prediction": predictions[i]} for i, row in enumerate(rows)]

    def score(self, records: Sequence[dict], ctx: Context) -> tuple[dict, list[dict]]:
        """Corpus BLEU and chrF per language pair and over all rows, with sacreBLEU's signatures."""
        pairs: dict[str, list[dict]] = {}
        for r in records:
            src = resolve_language(r["src_lang"])[0] if r.get("src_lang") else detect_language(r["source"])
            pairs.setdefault(f"{src}-{resolve_language(r['tgt_lang'])[0]}", []).append(r)

        def corpus(rows: Sequence[dict], tokenize: str) -> dict:
            hyps = [str(r["prediction"] or "") for r in rows]
            refs = [r["reference"] for r in rows]
            b, c = metrics.bleu(hyps, refs, tokenize), metrics.chrf(hyps, refs)
            return {
                "bleu": b["score"],
                "chrf": c["score"],
                "bleu_signature": b["signature"],
                "chrf_signature": c["signature"],
                "count": len(rows),
            }

        per_pair = {name: corpus(rows, bleu_tokenizer(rows[0]["tgt_lang"])) for name, rows in sorted(pairs.items())}
        tokenizers = {bleu_tokenizer(r["tgt_lang"]) for r in records}
        overall = corpus(records, tokenizers.pop() if len(tokenizers) == 1 else "13a")
        return {**overall, "pairs": per_pair}, list(records)


TASK = TranslateTask()

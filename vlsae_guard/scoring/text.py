"""CHAIR's word processing without NLTK data: ``word_tokenize`` and Pattern's ``singularize``.

The standard CHAIR scorer (LisaAnne/Hallucination ``chair.py``, and Maxlinn's Python 3 port
that LLaVA-era papers run) does ``nltk.word_tokenize(caption.lower())`` and then
``pattern.en.singularize`` on every token. ``word_tokenize`` needs the Punkt model (an NLTK
data download many users cannot make) and Pattern does not install on current Pythons, so both
are re-implemented here, rule for rule, including their quirks where those change which words
count as objects ("glass" becomes "glas", which is why the standard rules map "wine glas";
singular "bus" becomes "bu" and is not an object word; "scissors" is left alone).

Sentence splitting: ``word_tokenize`` first splits sentences with Punkt and detaches a period
only at the end of each sentence, so "a dog. the cat" gives "dog", "." but "2. dogs" keeps "2.".
:func:`sentences` re-implements Punkt's decision (each candidate end mark judged on "previous
word + mark + next token", its annotation passes, the realignment of closing brackets). What is
not reproduced is Punkt's trained English model (abbreviations, collocations, word-case
statistics): a short list of common abbreviations stands in for it. On lower-cased captions
that can change Len by a token, never which object words are found.
"""

from __future__ import annotations

import re
from functools import lru_cache

# --- sentence splitting (Punkt on lower-cased text) ------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Abbreviations after which Punkt's English model does not end a sentence (common ones; compared
# lower-case, without the final period).
ABBREVIATIONS = _words(
    "mr mrs ms dr st jr sr vs e.g i.e a.m p.m u.s inc co corp ltd jan feb aug sept oct nov dec "
    "mt ft"
)
# Punkt's candidate sentence ends: an end mark followed by punctuation or by a next token.
_NON_WORD = r"(?:[)\";}\]*:@'({\[!?])"
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_CANDIDATE = re.compile(rf"[.?!](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
# Punkt's own word tokenizer (only used to decide sentence ends).
_PUNKT_WORD = re.compile(
    rf"{_MULTI_CHAR}"
    rf"|(?=[^(\"`{{\[:;&#*@)}}\]\-,])\S+?"
    rf"(?=\s|$|{_NON_WORD}|{_MULTI_CHAR}|,(?=$|\s|{_NON_WORD}|{_MULTI_CHAR}))"
    r"|\S"
)
_REALIGN = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)", re.MULTILINE)
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]\.$")


def _sentence_breaks(tokens: list[str]) -> list[bool]:
    """Punkt's two annotation passes on lower-cased tokens (no capitalised words to weigh).

    First pass: a lone end mark or a word ending in "." (not an ellipsis, not an abbreviation)
    ends a sentence. Second pass: after an initial or a number, a following word that starts in
    lower case (or , ; : . ! ?) means the period was no sentence end.
    """
    breaks = []
    for tok in tokens:
        stem = tok[:-1]
        breaks.append(
            tok in (".", "?", "!")
            or (
                tok.endswith(".")
                and not tok.endswith("..")
                and stem not in ABBREVIATIONS
                and stem.split("-")[-1] not in ABBREVIATIONS
            )
        )
    for i, (tok, nxt) in enumerate(zip(tokens, tokens[1:], strict=False)):
        initial_or_number = _INITIAL.match(tok) or _NUMBER.match(tok)
        lower_next = nxt[:1].islower() or nxt in (";", ":", ",", ".", "!", "?")
        if breaks[i] and initial_or_number and lower_next:
            breaks[i] = False
    return breaks


def sentences(text: str) -> list[str]:
    """Split ``text`` (already lower-cased) into sentences the way Punkt would.

    Like Punkt, each candidate end mark is judged on the context "previous word + mark + next
    token": it ends a sentence when any token of that context but the last is a sentence end.
    """
    candidates: list[tuple[re.Match, int]] = []  # (match, start of the word before it)
    for m in _CANDIDATE.finditer(text):
        lo = candidates[-1][0].start() if candidates else 0
        space = max(text.rfind(c, lo, m.start()) for c in " \t\n\r\f\v")
        if space > lo:
            start = space + 1
        elif candidates:  # no space since the previous mark: this one's word starts there too
            prev, start = candidates[-1]
            if start < prev.start():
                candidates.pop()  # the two share a non-empty word: only the last mark counts
        else:
            start = 0
        candidates.append((m, start))
    spans, begin = [], 0
    for m, start in candidates:
        context = text[start : m.end()] + m.group("after")
        breaks = _sentence_breaks(_PUNKT_WORD.findall(context))
        if not any(breaks[:-1]):
            continue
        spans.append([begin, m.end()])
        begin = m.start("next") if m.group("next") else m.end()
    spans.append([begin, len(text.rstrip())])
    for prev, cur in zip(spans, spans[1:], strict=False):
        moved = _REALIGN.match(text, cur[0])  # closing quotes/brackets go with the sentence
        if moved:
            prev[1] = cur[0] + len(moved.group().rstrip())
            cur[0] = moved.end()
    return [text[a:b] for a, b in spans if text[a:b].strip()]


# --- NLTKWordTokenizer (the Treebank tokenizer that word_tokenize applies per sentence) -------

_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_CONTRACTIONS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)(?=\s)",
        r"(?i) ('t)(?#X)(is)\b",
        r"(?i) ('t)(?#X)(was)\b",
    )
]


def tokenize_sentence(text: str) -> list[str]:
    """NLTK's ``NLTKWordTokenizer().tokenize`` (Treebank rules with NLTK's improvements)."""
    for regexp, sub in _STARTING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp, sub in _PUNCTUATION:
        text = regexp.sub(sub, text)
    text = _PARENS[0].sub(_PARENS[1], text)
    text = _DOUBLE_DASHES[0].sub(_DOUBLE_DASHES[1], text)
    text = f" {text} "
    for regexp, sub in _ENDING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then the Treebank rules per sentence."""
    return [tok for sent in sentences(text) for tok in tokenize_sentence(sent)]


# --- Pattern's singularize -------------------------------------------------------------------

_PREPOSITIONS = _words(
    """about before during of till above behind except off to across below for on under after
    beneath from onto until among beside in out unto around besides into over upon at between
    near since with athwart betwixt beyond but by"""
)
_UNINFLECTED = _words(
    """bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn
    high-jinks proceedings whiting britches eland homework rabies wildebeest carp elk innings
    salmon chassis flounder jackanapes scissors christmas gallows mackerel series clippers
    georgia measles shears cod graffiti mews species contretemps mumps swine corps news
    swiss"""
)
_UNCOUNTABLE = _words(
    """advice equipment happiness luggage news software bread fruit information mathematics
    progress understanding butter furniture ketchup mayonnaise research water cheese garbage
    knowledge meat rice electricity gravel love mustard sand"""
)
# Pattern tests ``word.endswith(x + "s")`` and then returns the word unchanged (so "cookies"
# stays "cookies"); "^pie" and "^tie" never match because "^" is compared literally.
_IE_WORDS = tuple(
    sorted(
        _words(
            """alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie
    beanie eyrie indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie
    goonie laddie pixie techie bombie groupie laramie quickie ^tie collie hankie lingerie
    reverie toughie cookie hippie meanie rookie valkyrie"""
        )
    )
)
_IRREGULAR = {
    "atlantes": "atlas",
    "atlases": "atlas",
    "axes": "axe",
    "beeves": "beef",
    "brethren": "brother",
    "children": "child",
    "corpora": "corpus",
    "corpuses": "corpus",
    "ephemerides": "ephemeris",
    "feet": "foot",
    "ganglia": "ganglion",
    "geese": "goose",
    "genera": "genus",
    "genii": "genie",
    "graffiti": "graffito",
    "helves": "helve",
    "kine": "cow",
    "leaves": "leaf",
    "loaves": "loaf",
    "men": "man",
    "mongooses": "mongoose",
    "monies": "money",
    "moves": "move",
    "mythoi": "mythos",
    "numena": "numen",
    "occipita": "occiput",
    "octopodes": "octopus",
    "opera": "opus",
    "opuses": "opus",
    "our": "my",
    "oxen": "ox",
    "penes": "penis",
    "penises": "penis",
    "people": "person",
    "sexes": "sex",
    "soliloquies": "soliloquy",
    "teeth": "tooth",
    "testes": "testis",
    "trilbys": "trilby",
    "turves": "turf",
    "zoa": "zoon",
}
# (pattern, replacement), first match wins; group references to groups that did not take
# part in the match are dropped, as Pattern does.
_RULES = [
    (re.compile(p), r)
    for p, r in (
        (r"(?i)(.)ae$", r"\1a"),
        (r"(?i)(.)itis$", r"\1itis"),
        (r"(?i)(.)eaux$", r"\1eau"),
        (r"(?i)(quiz)zes$", r"\1"),
        (r"(?i)(matr)ices$", r"\1ix"),
        (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
        (r"(?i)^(ox)en", r"\1"),
        (r"(?i)(alias|status)es$", r"\1"),
        (r"(?i)([octop|vir])i$", r"\1us"),
        (r"(?i)(cris|ax|test)es$", r"\1is"),
        (r"(?i)(shoe)s$", r"\1"),
        (r"(?i)(o)es$", r"\1"),
        (r"(?i)(bus)es$", r"\1"),
        (r"(?i)([m|l])ice$", r"\1ouse"),
        (r"(?i)(x|ch|ss|sh)es$", r"\1"),
        (r"(?i)(m)ovies$", r"\1ovie"),
        (r"(?i)(.)ombies$", r"\1ombie"),
        (r"(?i)(s)eries$", r"\1eries"),
        (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", "arf"),
        (r"erves$", "erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"(?i)([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"(?i)(sive)s$", r"\1"),
        (r"(?i)(tive)s$", r"\1"),
        (r"(?i)(hive)s$", r"\1"),
        (r"(?i)([^f])ves$", r"\1fe"),
        (r"(?i)(^analy)ses$", r"\1sis"),
        (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(?i)(.)opses$", r"\1opsis"),
        (r"(?i)(.)yses$", r"\1ysis"),
        (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(?i)(.)oses$", r"\1osis"),
        (r"(?i)([ti])a$", r"\1um"),
        (r"(?i)(n)ews$", r"\1ews"),
        (r"(?i)s$", ""),
    )
]


@lru_cache(maxsize=200_000)
def singularize(word: str) -> str:
    """``pattern.en.singularize(word)`` (Pattern 2.6/3.6 rules, the ones CHAIR was run with)."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _UNINFLECTED) or any(x.endswith(w) for x in _UNCOUNTABLE):
        return word
    if any(w.endswith(x + "s") for x in _IE_WORDS):
        return w
    for plural, singular in _IRREGULAR.items():
        if w.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, replacement in _RULES:
        m = pattern.search(word)
        if m:
            for k, group in enumerate(m.groups(), start=1):
                if group is None:
                    replacement = replacement.replace(f"\\{k}", "")
            return pattern.sub(replacement, word)
    return word

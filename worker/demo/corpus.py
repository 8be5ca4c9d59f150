"""A small synthetic corpus for the offline demo tokenizers (see `pagedq.worker.demo.models`).

There is no hub and no dataset here: the demo tokenizers are trained on these word lists and on
sentences drawn from them with a fixed seed. The words are common English (and, for the translation
model's target side, German) so that realistic inputs tokenize into realistic pieces; characters outside
the lists still tokenize (WordPiece keeps every printable ASCII character, byte-level BPE every byte).

Invariant: `synthetic_sentences(words, n, seed)` returns the same sentences for the same arguments.
"""

from __future__ import annotations

import random
import string

ENGLISH_WORDS: tuple[str, ...] = tuple(
    """
    the be to of and a in that have i it for not on with he as you do at this but his by from they we say
    her she or an will my one all would there their what so up out if about who get which go me when make
    can like time no just him know take people into year your good some could them see other than then now
    look only come its over think also back after use two how our work first well way even new want because
    any these give day most us is are was were been has had did does said made went came took got saw
    great old big small long little high low right left large young early late last next few same different
    important public bad able best better sure free full hard easy clear open close real whole happy sad
    man woman child world life hand part place case week company system program question government number
    night point home water room mother father area money story fact month lot study book eye job word
    business issue side kind head house service friend power hour game line end member law car city community
    name president team minute idea kid body information school face others level office door health person
    art war history party result change morning reason research girl guy moment air teacher force education
    food price movie film music song weather phone computer service product quality delivery order customer
    love hate enjoy terrible awful excellent amazing wonderful boring poor fine okay nice horrible perfect
    fast slow cheap expensive broken working recommend return refund support problem experience staff
    paris london berlin france germany england europe river mountain capital country language english german
    tower museum city bridge street train station airport hotel restaurant coffee tea bread cheese wine
    red blue green white black yellow big dog cat bird fish tree flower sun moon star sky rain snow wind
    who what where when why how which whose answer ask tell find found show shows called named known
    built born lived wrote founded located famous largest oldest population million thousand hundred
    one two three four five six seven eight nine ten first second third century year years today tomorrow
    yesterday very really quite too much many more less most least again never always often sometimes
    here there everything nothing something someone everyone between under above before during without
    within through against among around while until since although though however therefore
    """.split()
)

GERMAN_WORDS: tuple[str, ...] = tuple(
    """
    der die das ein eine und ist sind war waren hat haben ich du er sie es wir ihr nicht mit von zu in im
    auf für an aus bei nach über unter vor durch gegen ohne um bis seit wie was wer wo wann warum welche
    gut schlecht groß klein alt neu jung lang kurz hoch schnell langsam schön teuer billig richtig falsch
    mann frau kind welt leben hand haus stadt land sprache wasser zeit tag woche monat jahr nacht morgen
    heute gestern buch schule arbeit freund familie geld essen brot käse wein kaffee tee musik film lied
    wetter telefon computer dienst produkt qualität lieferung bestellung kunde liebe hassen genießen
    schrecklich ausgezeichnet wunderbar langweilig perfekt empfehlen rückgabe problem erfahrung
    paris london berlin frankreich deutschland england europa fluss berg hauptstadt turm museum brücke
    straße zug bahnhof flughafen hotel restaurant rot blau grün weiß schwarz gelb hund katze vogel fisch
    baum blume sonne mond stern himmel regen schnee wind eins zwei drei vier fünf sechs sieben acht neun
    zehn erste zweite dritte jahrhundert sehr wirklich immer nie oft manchmal hier dort alles nichts etwas
    jemand jeder zwischen während innerhalb obwohl jedoch deshalb gebaut geboren gelebt geschrieben
    gegründet berühmt größte älteste bevölkerung million tausend hundert
    """.split()
)

_PUNCTUATION = (".", ".", ".", "!", "?", ",")


def synthetic_sentences(words: tuple[str, ...], count: int, seed: int) -> list[str]:
    """`count` pseudo-sentences of 4-20 words drawn from `words`, capitalised and punctuated."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 20)))
        sentences.append(body[0].upper() + body[1:] + rng.choice(_PUNCTUATION))
    return sentences


LATIN_LETTERS = "àáâäçèéêëíîïñóôöùúûüßÀÁÄÇÉÈÖÜ"  # accented letters common in European text


def printable_characters() -> list[str]:
    """Every printable non-space ASCII character (letters, digits, punctuation)."""
    return [c for c in string.printable if not c.isspace()]

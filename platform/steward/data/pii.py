"""PII recognizers: spans of e-mail addresses, phone numbers, cards, IBANs, IPs, URLs, IDs, birth dates, addresses.

Every recognizer is a pattern plus, where the format allows, a check that pattern alone cannot make (Luhn for cards,
mod-97 for IBANs, `ipaddress` for IPs; for phones, libphonenumber's possible lengths, how the number is grouped and
the words before it), because a long digit run in text is far more often an order number than a card or a phone.
Spans found by several recognizers are resolved by `resolve`: the longest wins, then the earlier type in
ENTITY_ORDER (an e-mail inside a URL is part of the URL).
"""

import functools
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from steward.spec.privacy import PATTERN_ENTITIES

ENTITY_ORDER = {name: i for i, name in enumerate((*PATTERN_ENTITIES, "person"))}


@dataclass(frozen=True)
class Span:
    """One entity found in a text: [start, end) and its type."""

    start: int
    end: int
    entity: str


EMAIL = re.compile(r"(?<![\w.+'-])[A-Za-z0-9][A-Za-z0-9._%+'-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]]", re.IGNORECASE)
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Compact (DE89370400440532013000) or printed in groups of four (GB82 WEST 1234 ...), any case.
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)\b", re.IGNORECASE)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# US social security numbers (no area 000, 666 or 9xx; no group 00; no serial 0000)
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
# UK National Insurance numbers. The prefix letters are not checked against HMRC's allocation rules: a specimen
# such as "QQ 12 34 56 C" is written exactly like an issued number, the same reason phones are matched in
# unassigned ranges.
NINO = re.compile(r"\b[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
DATE = (
    rf"(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}|"
    rf"\d{{1,2}}(?:st|nd|rd|th)? {MONTHS},? \d{{4}}|{MONTHS} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})"
)
# A birth date is a date right after words that say so: a date alone is as often a delivery date.
DOB = re.compile(
    rf"\b(?:born(?: on)?|d\.?o\.?b\.?|date of birth|birth ?date|birthday)\s*(?:is|was|:|-)?\s*(?P<date>{DATE})",
    re.IGNORECASE,
)
STREET_TYPES = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Close|Square|Sq"
)
STREET = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]? (?:[A-Z][a-z]+ ){{1,3}}(?:{STREET_TYPES})\b"
    rf"(?:,? (?:Apt|Suite|Unit|Flat) \d+[A-Za-z]?)?"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, the result mod 97 is 1."""
    code = text.replace(" ", "").upper()
    if not 15 <= len(code) <= 34 or not code[2:4].isdigit():
        return False
    rearranged = code[4:] + code[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _cards(text: str) -> Iterator[Span]:
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        # Issuer prefixes of the major networks (Visa 4, Mastercard 51-55 / 2221-2720, Amex 34/37, Discover 6,
        # Diners 36/38, JCB 35): a Luhn-valid run without one is as likely an account or tracking number.
        if 13 <= len(digits) <= 19 and re.match(r"4|5[1-5]|2[2-7]|3[4-8]|6", digits) and luhn_valid(digits):
            yield Span(match.start(), match.end(), "credit_card")


def _ibans(text: str) -> Iterator[Span]:
    for match in IBAN.finditer(text):
        value = match.group()
        # A printed IBAN may be followed by a word of four letters ("... 7654 32 bank"): drop trailing groups
        # until the checksum holds, longest first.
        ends = [len(value)] + [i for i in range(len(value) - 1, 4, -1) if value[i] == " "]
        end = next((e for e in ends if iban_valid(value[:e])), None)
        if end is not None:
            yield Span(match.start(), match.start() + end, "iban")


def _ips(text: str) -> Iterator[Span]:
    for pattern in (IPV4, IPV6):
        for match in pattern.finditer(text):
            try:
                ipaddress.ip_address(match.group())
            except ValueError:
                continue
            yield Span(match.start(), match.end(), "ip_address")


# Words just before a number that say what it is: a phone, or an identifier that only shares a phone's length.
PHONE_WORDS = re.compile(
    r"\b(?:phone|tel|telephone|call|calls|called|mobile|cell|fax|text|texts|dial|ring|whatsapp|sms|contact|"
    r"landline|line|hotline|helpline|voicemail|number is|reach (?:me|us)(?: on| at)?)\b",
    re.IGNORECASE,
)
ID_WORDS = re.compile(
    r"(?:#|\b(?:order|invoice|inv|tracking|ref|reference|id|account|acct|case|ticket|sku|serial|po|batch|lot|"
    r"isbn|ean|upc|zip|postcode|customer|member|membership|booking|confirmation|transaction|txn|receipt|"
    r"patent|part|model|build|version|code)\b\.?(?:\s*(?:number|num|no|nr)\b\.?)?)\W{0,3}$",
    re.IGNORECASE,
)
# A number joined to letters or digits by a hyphen or a dot is part of a longer code ("RX-555-0190"). A slash is
# not: "020 7946 0958/0959" is two lines of one office.
JOINED_BEFORE = re.compile(r"\w[-.]$")
JOINED_AFTER = re.compile(r"^[-.]\w")


def _phones(text: str, region: str) -> Iterator[Span]:
    import phonenumbers

    # POSSIBLE leniency: a number of a possible length for its region counts even when its range is unassigned,
    # reserved or fictional (555-01xx, Ofcom's drama ranges), because it is written exactly like a real one.
    # Precision comes from how the number is written and from the words just before it, not from its range.
    for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
        before = text[max(0, match.start - 30) : match.start]
        if ID_WORDS.search(before) or JOINED_BEFORE.search(before) or JOINED_AFTER.match(text[match.end :]):
            continue
        if _written_as_phone(match.raw_string, match.number, phonenumbers) or PHONE_WORDS.search(before):
            yield Span(match.start, match.end, "phone")


def _written_as_phone(raw: str, number, phonenumbers) -> bool:  # type: ignore[no-untyped-def]
    """An international number (+CC ...), or a national one grouped the way its country prints it.

    An unformatted digit run is not written as a phone, whatever its range: a bare run of a possible length is
    as often an id, a count or a code, so it counts only after a phone word. A national number must be grouped
    as libphonenumber formats it (a leading trunk prefix allowed), which tells "(212) 555-0147" from thousands
    grouping ("2 345 678") of the same digits.
    """
    if raw.lstrip().startswith("+"):
        return True
    groups = re.findall(r"\d+", re.split(r"[A-Za-z]", raw, maxsplit=1)[0])
    if len(groups) == 1:
        return False
    national = phonenumbers.PhoneNumber(country_code=number.country_code, national_number=number.national_number)
    national.italian_leading_zero = number.italian_leading_zero
    national.number_of_leading_zeros = number.number_of_leading_zeros
    expected = re.findall(r"\d+", phonenumbers.format_number(national, phonenumbers.PhoneNumberFormat.NATIONAL))
    prefix = phonenumbers.ndd_prefix_for_region(phonenumbers.region_code_for_country_code(number.country_code), True)
    if prefix and groups[0] == prefix and groups[1:] == expected:
        return True
    return groups == expected


def _regex(pattern: re.Pattern, entity: str, group: int | str = 0) -> Callable[[str], Iterator[Span]]:
    def find(text: str) -> Iterator[Span]:
        for match in pattern.finditer(text):
            yield Span(match.start(group), match.end(group), entity)

    return find


RECOGNIZERS: dict[str, Callable[[str], Iterator[Span]]] = {
    "email": _regex(EMAIL, "email"),
    "url": _regex(URL, "url"),
    "iban": _ibans,
    "credit_card": _cards,
    "ip_address": _ips,
    "national_id": lambda text: (s for p in (SSN, NINO) for s in _regex(p, "national_id")(text)),
    "date_of_birth": _regex(DOB, "date_of_birth", "date"),
    "street_address": _regex(STREET, "street_address"),
}


def find_spans(text: str, entities: list[str], region: str = "US") -> list[Span]:
    """Non-overlapping entity spans of the requested types in text, in order of position."""
    found: list[Span] = []
    for entity in entities:
        if entity == "phone":
            found.extend(_phones(text, region))
        elif entity == "person":
            found.extend(_people(text))
        else:
            found.extend(RECOGNIZERS[entity](text))
    return resolve(found)


def resolve(spans: list[Span]) -> list[Span]:
    """Keep the longest of overlapping spans (ties: the earlier type in ENTITY_ORDER), sorted by start."""
    ranked = sorted(spans, key=lambda s: (-(s.end - s.start), ENTITY_ORDER[s.entity], s.start))
    kept: list[Span] = []
    for span in ranked:
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


def _people(text: str) -> Iterator[Span]:
    """Person names from the optional spaCy pipeline (the spec refuses `person` when none is installed)."""
    for ent in _ner()(text).ents:
        if ent.label_ == "PERSON":
            yield Span(ent.start_char, ent.end_char, "person")


@functools.lru_cache(maxsize=1)
def _ner():  # type: ignore[no-untyped-def]
    import spacy

    from steward.spec.privacy import ner_backend

    return spacy.load(ner_backend(), disable=["parser", "lemmatizer"])

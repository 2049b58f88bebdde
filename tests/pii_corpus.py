"""Labelled records for PII detection tests: (text, [(exact value, entity type), ...]).

Realistic support tickets, reviews, forms and logs; valid and invalid (checksum-broken) cards and IBANs,
numbers that only look like phone numbers (order ids, amounts, versions, dates), and text with no PII at all.
Test card numbers are the networks' published test numbers; IBANs are the registry's example IBANs.
"""

RECORDS: list[tuple[str, list[tuple[str, str]]]] = [
    # e-mail
    ("Please reply to john.smith@example.com before Friday.", [("john.smith@example.com", "email")]),
    (
        "Contact: a.o'neil+billing@sub.mail-server.co.uk (billing)",
        [("a.o'neil+billing@sub.mail-server.co.uk", "email")],
    ),
    ("Send the CV to HR@Company.org, thanks", [("HR@Company.org", "email")]),
    (
        "my email is maria_garcia99@gmail.com and my backup is mg@proton.me",
        [("maria_garcia99@gmail.com", "email"), ("mg@proton.me", "email")],
    ),
    ("The @ sign and user@ alone are not addresses; neither is a@b.", []),
    # phones: international and national
    ("Call me on +44 20 7946 0958 after six.", [("+44 20 7946 0958", "phone")]),
    ("Our Paris office: +33 1 42 68 53 00.", [("+33 1 42 68 53 00", "phone")]),
    ("US support line (415) 555-2671, ext 4", [("(415) 555-2671, ext 4", "phone")]),
    ("Text 212-555-0182 if the courier is late", [("212-555-0182", "phone")]),
    ("Berlin number +49 30 901820 for appointments", [("+49 30 901820", "phone")]),
    ("Mobile: +1 650 253 0000", [("+1 650 253 0000", "phone")]),
    # phone lookalikes
    ("Order 12345678 shipped on 2024-03-05 with tracking 1Z999AA10123456784.", []),
    ("The invoice total was 1,234,567.89 dollars for 3 units.", []),
    ("Upgrade from version 10.2.3 to 10.4.0 fixed the crash.", []),
    ("Meeting moved to 14:30-15:45 in room 2301.", []),
    ("Reference number 000-000-0000 was rejected by the system.", []),
    ("We sold 5551234 units in 2023", []),
    # credit cards: valid (Luhn) and invalid
    ("Card 4111 1111 1111 1111 was charged twice.", [("4111 1111 1111 1111", "credit_card")]),
    ("Paid with 5500-0000-0000-0004 yesterday", [("5500-0000-0000-0004", "credit_card")]),
    ("amex 378282246310005 declined", [("378282246310005", "credit_card")]),
    ("Use 6011111111111117 for the refund", [("6011111111111117", "credit_card")]),
    ("Typo card 4111 1111 1111 1112 does not pass the checksum", []),
    ("Account 1234567812345678 is not a card number", []),
    # IBANs: valid and invalid
    ("Transfer to GB82 WEST 1234 5698 7654 32 please", [("GB82 WEST 1234 5698 7654 32", "iban")]),
    ("IBAN DE89370400440532013000, BIC COBADEFFXXX", [("DE89370400440532013000", "iban")]),
    ("Our account FR1420041010050500013M02606 for rent", [("FR1420041010050500013M02606", "iban")]),
    ("Wrong digits: GB82 WEST 1234 5698 7654 33 bounced", []),
    ("Reference DE00370400440532013000 is not an IBAN", []),
    # IP addresses
    ("Login from 192.168.1.20 failed three times", [("192.168.1.20", "ip_address")]),
    ("server at 10.0.0.1, gateway 10.0.0.254", [("10.0.0.1", "ip_address"), ("10.0.0.254", "ip_address")]),
    ("IPv6 peer 2001:db8::8a2e:370:7334 connected", [("2001:db8::8a2e:370:7334", "ip_address")]),
    (
        "loopback ::1 is local; fe80::1ff:fe23:4567:890a link-local",
        [("::1", "ip_address"), ("fe80::1ff:fe23:4567:890a", "ip_address")],
    ),
    ("999.300.1.1 is not an address, nor is 1.2.3", []),
    ("The game ended 3:2:1 after extra time at 10:30:00", []),
    # URLs
    ("Read https://example.com/docs?id=42 for details.", [("https://example.com/docs?id=42", "url")]),
    ("see www.my-site.org/profile/jdoe", [("www.my-site.org/profile/jdoe", "url")]),
    ("Photos at http://192.0.2.4:8080/album (private)", [("http://192.0.2.4:8080/album", "url")]),
    # national IDs
    ("SSN 123-45-6789 on file", [("123-45-6789", "national_id")]),
    ("National Insurance number AB 12 34 56 C", [("AB 12 34 56 C", "national_id")]),
    ("Not an SSN: 000-12-3456 or 666-12-3456", []),
    # dates of birth
    ("Patient born on 14 March 1985 in Leeds", [("14 March 1985", "date_of_birth")]),
    ("DOB: 1990-02-03", [("1990-02-03", "date_of_birth")]),
    ("date of birth 07/11/1979, admitted today", [("07/11/1979", "date_of_birth")]),
    ("Her birthday is March 5, 2001", [("March 5, 2001", "date_of_birth")]),
    ("Delivered on 2024-01-02, invoice dated 03/04/2024.", []),
    # street addresses
    ("I live at 221B Baker Street since May", [("221B Baker Street", "street_address")]),
    ("Ship to 1600 Pennsylvania Avenue, Washington", [("1600 Pennsylvania Avenue", "street_address")]),
    ("Office: 10 Downing St, London", [("10 Downing St", "street_address")]),
    ("We walked 5 miles down the road yesterday", []),
    # mixed
    (
        "Hi, I'm at jane.roe@mail.com, +1 415-555-2671, card 4012 8888 8888 1881, from 203.0.113.9",
        [
            ("jane.roe@mail.com", "email"),
            ("+1 415-555-2671", "phone"),
            ("4012 8888 8888 1881", "credit_card"),
            ("203.0.113.9", "ip_address"),
        ],
    ),
    (
        "Refund to NL91ABNA0417164300 and mail receipt to pay@shop.nl",
        [("NL91ABNA0417164300", "iban"), ("pay@shop.nl", "email")],
    ),
    # no PII
    ("The movie was great and the staff were friendly.", []),
    ("Food was cold, service slow, 2 out of 10 would not return.", []),
    ("Chapter 3 covers sections 3.1 to 3.4 on pages 12-19.", []),
    ("The meeting is on Monday at 9am in building 4.", []),
    ("Temperature rose to 21.5 degrees by noon on 12/06.", []),
]

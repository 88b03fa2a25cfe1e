"""PII corpus: >= 150 positives (each must be redacted by the named rule) and >= 100 close negatives (order
numbers, dates, version strings, hashes, placeholders such as ``password=<redacted>``, public keys, loopback
addresses, documentation examples ... must come through untouched), across every kind and the shapes agent traffic
takes: chat, JSON tool arguments, logs, env files, CLI flags, URLs, headers."""

from __future__ import annotations

import pytest

from adaptloop.erasure import subject_key
from adaptloop.streams.pii import Redaction, Redactor, redact_record

SECRET = "pii-test-subject-secret-0123456789"

POSITIVES = [  # (text, rule, the substring that must disappear)
    ("Contact me at alice.martin@example.com please", "email", "alice.martin@example.com"),
    ("mail: Bob_Smith+orders@mail.example.co.uk", "email", "Bob_Smith+orders@mail.example.co.uk"),
    ("send it to j.doe@sub.domain.org.", "email", "j.doe@sub.domain.org"),
    ("<priya.sharma@acme-corp.io>", "email", "priya.sharma@acme-corp.io"),
    ("reply to OMAR.HADDAD@EXAMPLE.NET asap", "email", "OMAR.HADDAD@EXAMPLE.NET"),
    ("cc x_y-z@foo-bar.travel", "email", "x_y-z@foo-bar.travel"),
    ("his address is mei.chen123@gmail.com, thanks", "email", "mei.chen123@gmail.com"),
    ("email=lars.berg@firma.no", "email", "lars.berg@firma.no"),
    ("Call me at +1 415-555-2671 tomorrow", "phone", "415-555-2671"),
    ("my number is (415) 555-2671", "phone", "555-2671"),
    ("UK: +44 20 7946 0958", "phone", "7946 0958"),
    ("Ring +33 1 42 68 53 00 for the shop", "phone", "42 68 53 00"),
    ("tel. +49 30 901820", "phone", "901820"),
    ("phone: 415.555.2671", "phone", "415.555.2671"),
    ("call 4155552671 after 5", "phone", "4155552671"),
    ("mobile +81 3-3224-9999", "phone", "3224-9999"),
    ("whatsapp +34 612 345 678", "phone", "612 345 678"),
    ("reach me on 212-555-0147", "phone", "212-555-0147"),
    ("Office +1 (646) 555-0199 ext", "phone", "555-0199"),
    ("+61 2 9374 4000 is the Sydney line", "phone", "9374 4000"),
    ("card 4111 1111 1111 1111 exp 12/29", "card", "4111 1111 1111 1111"),
    ("pay with 5555555555554444", "card", "5555555555554444"),
    ("amex 3782-822463-10005", "card", "3782-822463-10005"),
    ("visa 4012888888881881 please", "card", "4012888888881881"),
    ("my card number: 6011 1111 1111 1117", "card", "6011 1111 1111 1117"),
    ("mastercard 2223 0031 2200 3222", "card", "2223 0031 2200 3222"),
    ("jcb 3530111333300000 ok", "card", "3530111333300000"),
    ("use 4000-0566-5566-5556 for it", "card", "4000-0566-5566-5556"),
    ("IBAN DE89 3704 0044 0532 0130 00", "iban", "DE89 3704 0044 0532 0130 00"),
    ("transfer to GB29NWBK60161331926819", "iban", "GB29NWBK60161331926819"),
    ("FR14 2004 1010 0505 0001 3M02 606 is mine", "iban", "FR14 2004 1010 0505 0001 3M02 606"),
    ("NL91ABNA0417164300", "iban", "NL91ABNA0417164300"),
    ("iban: ES9121000418450200051332", "iban", "ES9121000418450200051332"),
    # (was BE68 5390 0754 7034: it passes ISO's mod-97 but not the Belgian account number's own check, which
    # stdnum checks; it was never redacted)
    ("BE71 0961 2345 6769 for refunds", "iban", "BE71 0961 2345 6769"),
    ("server at 192.168.1.23 is down", "ip", "192.168.1.23"),
    ("client ip 203.0.113.7 blocked", "ip", "203.0.113.7"),
    ("from 8.8.8.8, yes", "ip", "8.8.8.8"),
    ("ipv6 2001:db8:85a3::8a2e:370:7334 seen", "ip", "2001:db8:85a3::8a2e:370:7334"),
    ("login from fe80::1ff:fe23:4567:890a", "ip", "fe80::1ff:fe23:4567:890a"),
    ("host 10.0.0.254 responded", "ip", "10.0.0.254"),
    ("aws key AKIAIOSFODNN7EXAMPLE leaked", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_1234567890abcdefghijklmnopqrstuvwxyzAB", "secret", "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB"),
    ("slack xoxb-123456789012-abcdefghijkl", "secret", "xoxb-123456789012-abcdefghijkl"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("key AIzaSyA1234567890abcdefghijklmnopqrstuv", "secret", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("OPENAI_API_KEY sk-proj-abcdefghijklmnopqrstuvwx123456", "secret", "sk-proj-abcdefghijklmnopqrstuvwx123456"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "secret",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("Authorization: Bearer abcDEF123456ghiJKL789", "secret", "abcDEF123456ghiJKL789"),
    ("password=Hunter2Hunter2!", "secret", "Hunter2Hunter2!"),
    ("api_key: 'q8w7e6r5t4y3u2i1'", "secret", "q8w7e6r5t4y3u2i1"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "secret", "MIIEowIBAAKCAQEA"),
    ("pasted, cut short: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nBG5vbmUAAAAEbm9uZQ", "secret",
     "b3BlbnNzaC1rZXktdjEAAAAA"),
    ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\nlQOYBFxyzAbCdEfGh\n=Xy1z\n-----END PGP PRIVATE KEY BLOCK-----",
     "secret", "lQOYBFxyzAbCdEfGh"),
    ("truncated PGP: -----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBFxyzAbCdEfGhIjKl", "secret", "lQOYBFxyzAbCdEfGhIjKl"),
    ("employee EMP-004211 asked", "custom:employee", "EMP-004211"),
    ("Alice (alice@example.com, +1 415-555-2671) paid with 4111111111111111", "card", "4111111111111111"),
    ("db password: s3cr3tP@ssw0rd", "secret", "s3cr3tP@ssw0rd"),
    # Agent traffic as it comes: chat, JSON tool arguments, logs, env files, URLs, headers.
    # e-mail in tool arguments, headers, logs, env files, code
    ('{"to": "dana.kowalski@example.org", "subject": "Refund for order 4815"}', "email", "dana.kowalski@example.org"),
    ("From: Kenji Watanabe <kenji.watanabe@example.jp>", "email", "kenji.watanabe@example.jp"),
    ("2024-03-15 10:22:01 INFO login ok user=maria.garcia@example.es from 127.0.0.1", "email", "maria.garcia@example.es"),
    ("mailto:support+ticket42@help.example.com", "email", "support+ticket42@help.example.com"),
    ("CONTACT_EMAIL=ops-team@example.net", "email", "ops-team@example.net"),
    ('send_email(to="li.wei@example.cn", body="Your parcel is late")', "email", "li.wei@example.cn"),
    ("User ahmed.ali99@example.ae wrote: please cancel my subscription", "email", "ahmed.ali99@example.ae"),
    ("cc: first.last@sub.example.co.za; bcc: boss@example.com", "email", "first.last@sub.example.co.za"),
    ("Reply-To: noreply-billing@shop.example.com", "email", "noreply-billing@shop.example.com"),
    # phones: "00" exit code, JSON, logs
    ("call 0044 20 7946 0958 after 6pm", "phone", "7946 0958"),
    ("Tel: 0049 30 901820", "phone", "901820"),
    ("ring me on 0033 1 42 68 53 00", "phone", "42 68 53 00"),
    ("whatsapp 0034 612 345 678", "phone", "612 345 678"),
    ("Call 0061 2 9374 4000 for the Sydney office", "phone", "9374 4000"),
    ('{"name": "Omar", "tel": "+33 6 12 34 56 78"}', "phone", "12 34 56 78"),
    ("phone=+1-202-555-0173", "phone", "202-555-0173"),
    ("SMS sent to +49 151 23456789", "phone", "23456789"),
    ("my cell: +91 98765 43210", "phone", "98765 43210"),
    ("call +31 20 624 1111 before noon", "phone", "624 1111"),
    ("fax +1 (212) 555-0188", "phone", "555-0188"),
    ("Sede: +39 06 6988 4857", "phone", "6988 4857"),
    ("text me at 646-555-0123", "phone", "646-555-0123"),
    ('{"customer_phone": "+44 7911 123456"}', "phone", "7911 123456"),
    # payment cards
    ('{"card_number": "4242424242424242", "exp": "12/30"}', "card", "4242424242424242"),
    ("card: 5105-1051-0510-5100", "card", "5105-1051-0510-5100"),
    ("amex 371449635398431 on file", "card", "371449635398431"),
    ("Diners 3056 9309 0259 04", "card", "3056 9309 0259 04"),
    ("discover 6011000990139424", "card", "6011000990139424"),
    ("visa 4000 0027 6000 3184", "card", "4000 0027 6000 3184"),
    ("charge 4111-1111-1111-1111 for $20", "card", "4111-1111-1111-1111"),
    ("JCB 3566 0020 2036 0505", "card", "3566 0020 2036 0505"),
    ("UnionPay 6200000000000005", "card", "6200000000000005"),
    ("payment_method=card pan=5555555555554444 status=declined", "card", "5555555555554444"),
    # IBANs, any case
    ("iban de89 3704 0044 0532 0130 00", "iban", "de89 3704 0044 0532 0130 00"),
    ("IBAN: gb29 nwbk 6016 1331 9268 19", "iban", "gb29 nwbk 6016 1331 9268 19"),
    ("account Gb29Nwbk60161331926819", "iban", "Gb29Nwbk60161331926819"),
    ('{"iban": "fr1420041010050500013m02606"}', "iban", "fr1420041010050500013m02606"),
    ("CH93 0076 2011 6238 5295 7", "iban", "CH93 0076 2011 6238 5295 7"),
    ("IT60 X054 2811 1010 0000 0123 456 (Milano)", "iban", "IT60 X054 2811 1010 0000 0123 456"),
    ("AT61 1904 3002 3457 3201", "iban", "AT61 1904 3002 3457 3201"),
    ("PL61 1090 1014 0000 0712 1981 2874", "iban", "PL61 1090 1014 0000 0712 1981 2874"),
    ("pay to NO93 8601 1117 947 today", "iban", "NO93 8601 1117 947"),
    ("SE45 5000 0000 0583 9825 7466", "iban", "SE45 5000 0000 0583 9825 7466"),
    ("es91 2100 0418 4502 0005 1332", "iban", "es91 2100 0418 4502 0005 1332"),
    # IP addresses
    ("Failed password for root from 198.51.100.23 port 22 ssh2", "ip", "198.51.100.23"),
    ('{"client_ip": "172.16.254.1", "status": 403}', "ip", "172.16.254.1"),
    ("X-Forwarded-For: 203.0.113.195, 70.41.3.18", "ip", "203.0.113.195"),
    ('192.0.2.44 - - [15/Mar/2024:12:30:45 +0000] "GET / HTTP/1.1" 200', "ip", "192.0.2.44"),
    ("ipv6 2a00:1450:4001:82b::200e", "ip", "2a00:1450:4001:82b::200e"),
    ("peer [2001:db8::ff00:42:8329]:443", "ip", "2001:db8::ff00:42:8329"),
    ("ssh deploy@10.20.30.40", "ip", "10.20.30.40"),
    ("host=100.64.0.12 port=5432", "ip", "100.64.0.12"),
    ("redis at 10.0.0.7:6379 timed out", "ip", "10.0.0.7"),
    # secrets in JSON (tool arguments), any quoting and spacing
    ('{"password": "Tr0ub4dor&3"}', "secret", "Tr0ub4dor&3"),
    ('{"username":"admin","password":"correct-horse-42"}', "secret", "correct-horse-42"),
    ("{'api_key': 'a8f5f167f44f4964e6c998dee827110c'}", "secret", "a8f5f167f44f4964e6c998dee827110c"),
    ('{"client_secret" : "Zx8Kq2LmN4pR7sT1"}', "secret", "Zx8Kq2LmN4pR7sT1"),
    ('{"token": "tok_1MzT9a2eZvKYlo2C0x8xYb"}', "secret", "tok_1MzT9a2eZvKYlo2C0x8xYb"),
    ('{"body": "{\\"password\\": \\"hunter22\\"}"}', "secret", "hunter22"),
    ('{"refresh_token": "1//0gXkZ9example-refresh-Tok3n", "expires_in": 3599}', "secret", "1//0gXkZ9example-refresh-Tok3n"),
    ('{"access_token":"ya29.a0AfH6SMBx3dExampleTokenValue99","token_type":"Bearer"}', "secret", "ya29.a0AfH6SMBx3dExampleTokenValue99"),
    ('{"SecretAccessKey": "9drTJvcXLB89EXAMPLELB8923FB892xMFI", "AccessKeyId": "ASIAY34FZKBOKMUTVV7A"}', "secret",
     "9drTJvcXLB89EXAMPLELB8923FB892xMFI"),
    ('{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\nBKcwggSjAgEAAoIBAQC7\\n-----END PRIVATE KEY-----\\n"}',
     "secret", "BKcwggSjAgEAAoIBAQC7"),
    ('"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvgIBADANBgkqhkiG9w0BAQEFAASC\\nAmDx3Kq9', "secret", "AmDx3Kq9"),
    ("const config = { password: 'n0de-Secret' }", "secret", "n0de-Secret"),
    ('connect(host="db", user="app", password="Pyth0n-pw")', "secret", "Pyth0n-pw"),
    ('client = OpenAI(api_key="9c8b7a6d5e4f3a2b1c0d")', "secret", "9c8b7a6d5e4f3a2b1c0d"),
    ("'password' => 'Php-S3cret'", "secret", "Php-S3cret"),
    ('{"username": "bob", "password1": "Dj4ngo!pw", "password2": "Dj4ngo!pw2"}', "secret", "Dj4ngo!pw2"),
    ("POST /signup password=Tr0ub4dor%263&password_confirmation=Tr0ub4dor%263", "secret", "Tr0ub4dor%263"),
    ('if password == "letmein42":', "secret", "letmein42"),
    ('ansible_become_pass: "B3come!"', "secret", "B3come!"),
    # cloud secret access keys
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("AWS_SECRET_ACCESS_KEY=je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY", "secret", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"),
    ("Access key ID,Secret access key\nAKIAIOSFODNN7EXAMPLE,wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("DefaultEndpointsProtocol=https;AccountName=acmestore;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErC"
     "z4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;EndpointSuffix=core.windows.net", "secret", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6"),
    ("Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
     "SharedAccessKey=3kW2xYz9AbCdEfGhIjKlMnOpQrStUvWx0123456789+/=", "secret", "3kW2xYz9AbCdEfGhIjKlMnOpQrStUvWx0123456789"),
    ("https://acme.blob.core.windows.net/exports/q1.csv?sv=2022-11-02&ss=b&srt=o&sp=r&sig=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D",
     "secret", "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA"),
    ("AZURE_CLIENT_SECRET=abc8Q~Zx7yW6vU5tS4rQ3pO2nM1lK0jI9hG8fE7d", "secret", "abc8Q~Zx7yW6vU5tS4rQ3pO2nM1lK0jI9hG8fE7d"),
    ("the app's secret value is Xyz8Q~aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567", "secret", "Xyz8Q~aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"),
    ("GOOGLE_CLIENT_SECRET=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", "secret", "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"),
    ("pasted from gcloud: 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", "secret", "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"),
    # env files, CLI flags, query strings
    ("DB_PASSWORD=Sup3rS3cret!", "secret", "Sup3rS3cret!"),
    ("POSTGRES_PASSWORD=pgAdm1n", "secret", "pgAdm1n"),
    ("POSTGRES_PASSWORD=pg", "secret", "=pg"),
    ("export MYSQL_ROOT_PASSWORD='r00t-pass'", "secret", "r00t-pass"),
    ("PGPASSWORD=s3cr3t psql -h db -U app", "secret", "s3cr3t"),
    ("docker run -e POSTGRES_PASSWORD=mysecretpassword -d postgres", "secret", "mysecretpassword"),
    ("client_secret=Gx7_Lk2-Pq9sVb3N", "secret", "Gx7_Lk2-Pq9sVb3N"),
    ("CLIENT_SECRET=abcDEF123456ghiJKL", "secret", "abcDEF123456ghiJKL"),
    ("API_TOKEN=9c1f7e2ab4d84e6f", "secret", "9c1f7e2ab4d84e6f"),
    ("JWT_SECRET=8c6976e5b5410415bde908bd4dee15df", "secret", "8c6976e5b5410415bde908bd4dee15df"),
    ("token=4f9d2c7a1b8e6f30 ./sync.sh", "secret", "4f9d2c7a1b8e6f30"),
    ("GET /api/v1/export?token=9f2c1a7b3e&format=csv HTTP/1.1", "secret", "9f2c1a7b3e"),
    ("https://api.example.com/data?api_key=5b3ce3597851110001cf6248&q=berlin", "secret", "5b3ce3597851110001cf6248"),
    ("callback?code=4%2F0Ad&client_secret=s3cr3tV4lue&grant_type=authorization_code", "secret", "s3cr3tV4lue"),
    ("https://graph.example.com/me?access_token=EAAGm0PX4ZCpsBA1b2c3d4", "secret", "EAAGm0PX4ZCpsBA1b2c3d4"),
    ("mysql -h db.internal -u app --password=Appp4ss shop", "secret", "Appp4ss"),
    ("./deploy.sh --db-password 'Tr1cky#Pass' --env prod", "secret", "Tr1cky#Pass"),
    ("./deploy.sh --client-secret a1b2c3d4e5f6g7h8", "secret", "a1b2c3d4e5f6g7h8"),
    ("python sync.py --api-key 0a1b2c3d4e5f6a7b8c9d", "secret", "0a1b2c3d4e5f6a7b8c9d"),
    ("--token=Zq8Xw7Vu6Ts5 --verbose", "secret", "Zq8Xw7Vu6Ts5"),
    ("vault login -method=userpass username=ops password=V@ult3d!", "secret", "V@ult3d!"),
    ("Driver={ODBC Driver 18};Server=db.example.com;UID=sa;PWD=Str0ng!Pass;", "secret", "Str0ng!Pass"),
    # passwords in URLs, whatever the host
    ("postgres://admin:s3cret@10.0.0.5:5432/db", "secret", "s3cret"),
    ("redis://:pw@localhost:6379", "secret", ":pw@"),
    ("mongodb://app:Mongo%40Pass1@127.0.0.1:27017/app", "secret", "Mongo%40Pass1"),
    ("mysql://root:toor@192.168.0.10/shop", "secret", "toor"),
    ("amqp://svc:rabbit-Pa55@localhost:5672/", "secret", "rabbit-Pa55"),
    ("DATABASE_URL=postgresql://admin:s3cretpass@db.example.com:5432/prod", "secret", "s3cretpass"),
    ("git clone https://deploy:gh-t0ken-9x@git.example.com/org/repo.git", "secret", "gh-t0ken-9x"),
    ("postgres://u:p@ss:w0rd@[2001:db8::5]:5432/app", "secret", "p@ss:w0rd"),
    ("rediss://default:AbC123xyz@10.1.2.3:6380/0", "secret", "AbC123xyz"),
    # headers, YAML, chat, XML, curl
    ("curl -u admin:S3cr3t! https://api.example.com/health", "secret", "S3cr3t!"),
    ("curl -H 'Authorization: Basic YWRtaW46czNjcjN0' https://api.example.com", "secret", "YWRtaW46czNjcjN0"),
    ('curl -H "X-Api-Key: 7f3e9a1c5b2d4e6f" https://api.example.com/v2/items', "secret", "7f3e9a1c5b2d4e6f"),
    ("password: Sp4rkl3!", "secret", "Sp4rkl3!"),
    ('  db_password: "hunter22"', "secret", "hunter22"),
    ("secret_key: 'dj4ng0-s3cr3t-k3y-abcdef'", "secret", "dj4ng0-s3cr3t-k3y-abcdef"),
    ("my password is Hunter2!", "secret", "Hunter2!"),
    ("the wifi password is: Summer2024", "secret", "Summer2024"),
    ("our API key is 3f9a8b7c6d5e4f3a2b1c", "secret", "3f9a8b7c6d5e4f3a2b1c"),
    ("<password>Xml-P4ss!</password>", "secret", "Xml-P4ss!"),
    ("ssh-keygen asked for a passphrase: 'blue-Whale-77'", "secret", "blue-Whale-77"),
    ("HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "secret", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"),
    ("gitlab token glpat-xYz123AbC456dEf789gH", "secret", "glpat-xYz123AbC456dEf789gH"),
    ("use alk_1a2b3c4d_Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u as the key", "secret",
     "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u"),
    # user patterns
    ('{"employee_id": "EMP-118822", "action": "approve"}', "custom:employee", "EMP-118822"),
    ("log: approved by EMP-000917 at 09:30", "custom:employee", "EMP-000917"),
    ("EMP-552310 and EMP-552311 requested access", "custom:employee", "EMP-552311"),
    ("customer CUS-20240315 called twice", "custom:customer", "CUS-20240315"),
    ('{"customer": "CUS-00012345", "tier": "gold"}', "custom:customer", "CUS-00012345"),
]

NEGATIVES = [
    "replica http://127.0.0.1:18000 answered",
    "the server listens on 0.0.0.0:8080 and [::1]:8443",
    "Order #4815162342 ships Monday",
    "order number 100045678 is confirmed",
    "invoice INV-2024-000123",
    "tracking 1Z999AA10123456784",
    "PO 20240315-0042 received",
    "reference 987654321012 for your claim",
    "SKU 4006381333931 in stock",
    "on 2024-03-15 we met",
    "deadline 15/03/2024",
    "dated 03.15.2024",
    "at 2024-03-15T12:30:45Z the job ran",
    "timestamp 2024-03-15T12:30:45.123+01:00",
    "between 09:30 and 17:45",
    "time 12:30:45",
    "version 2.14.3 released",
    "upgrade to v1.2.3.4 now",
    "Python 3.11.4 is required",
    "release 10.0.19041.1 of Windows",
    "torch==2.13.0+cpu",
    "price $1,299.99 each",
    "costs EUR 4.500,00 total",
    "quantity 12 x 3.50 = 42.00",
    "temperature 23.5 C",
    "coordinates 48.8566, 2.3522",
    "Alice Martin wants 3 x desk lamp delivered to Lyon by Monday.",
    '{"customer": "Omar Haddad", "product": "USB cable", "quantity": 40, "city": "Oslo", "deadline": "March 3"}',
    "Please ship 17 units of office chair to Porto for Mei Chen, due next week.",
    "room 1203, floor 12",
    "the score was 1-0-2-3",
    "ISBN 978-3-16-148410-0",
    "ratio 1:2:3",
    "see section 4.2.1.3 of the spec",
    "chapter 192.168 of the novel",
    "the year 1999 and 2024",
    "call me maybe",
    "an email about the order",
    "user@ is not complete",
    "at example.com we sell mugs",
    "hash a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sk-short",
    "api_key is missing",
    "password reset requested",
    "DE89 is a prefix",
    "GB29 bank code",
    "account 12345678 sort code 12-34-56",
    "batch 4111-1111 only",
    "serial 1234 5678 9012 3456",
    "mac 00:1B:44:11:3A:B7",
    "weight 2.5 kg and 3.75 kg",
    "phone case x 2 delivered to Denver",
    "1,234,567 units sold",
    "port 8080 and 443",
    "build 20240315.7",
    "order 3 of 12 on 2024-01-02",
    # secrets that are not there: placeholders, masks, templates, references, schema words
    "password=<redacted>",
    "password: ********",
    '{"password": "********"}',
    '{"password": "[SECRET]", "user": "admin"}',
    "DB_PASSWORD=${DB_PASSWORD}",
    "POSTGRES_PASSWORD: ${{ secrets.POSTGRES_PASSWORD }}",
    'password = os.environ["DB_PASSWORD"]',
    "api_key=YOUR_API_KEY",
    'export OPENAI_API_KEY="<your-api-key>"',
    "token: <token>",
    "client_secret=xxxxxxxxxxxxxxxx",
    "Authorization: Bearer <ACCESS_TOKEN>",
    "aws_secret_access_key = <your-secret-access-key>",
    "AccountKey=<storage-account-key>;EndpointSuffix=core.windows.net",
    "<password>${env.NEXUS_PASSWORD}</password>",
    "password: !vault |",
    "password: {{ vault_db_password }}",
    "password=%(db_password)s",
    "password: null",
    '{"password": "", "remember_me": true}',
    "postgres://user:password@localhost:5432/mydb",
    "postgresql://user:password@db.example.com:5432/app",
    "postgres://app:${PGPASSWORD}@db.internal:5432/app",
    "redis://localhost:6379/0",
    "https://example.com:8443/path?page=2&sort=asc",
    "curl -u $API_USER:$API_PASS https://api.example.com",
    # the words around secrets, in prose and code
    "the password is too short",
    "Forgot your password? Reset password: click the link we sent",
    "Your password must be at least 12 characters",
    "The password is 12 characters long",
    "password: required",
    "use the --password flag to pass it on the command line",
    "the --token option expects a file path",
    "docker login --password-stdin < token.txt",
    "PasswordAuthentication no",
    "cat /etc/passwd",
    "PWD=/home/alice/project",
    "def login(user: str, password: str) -> bool:",
    "password: Optional[str] = None",
    "sasl_password=kafka.sasl_password.get_secret_value()",
    "api_key=settings.openai_api_key",
    "self.password = password",
    "if password == stored_password:",
    "hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt())",
    "password = input('Password: ')",
    "PASSWORD_MIN_LENGTH=12",
    "bypass=true",
    "secretName: db-credentials",
    "kind: Secret",
    '{"secret": false, "shared": true}',
    '{"password_reset_url": "https://example.com/reset", "password_min_length": 12}',
    '{"token_type": "Bearer", "expires_in": 3600}',
    '{"usage": {"prompt_tokens": 52, "completion_tokens": 148, "total_tokens": 200}}',
    "max_tokens=256, temperature=0.2",
    '{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<s>"}',
    "tokenizer.pad_token = tokenizer.eos_token",
    '{"token": "\u2581understanding", "logprob": -0.12}',
    '{"next_page_token": "CiAKGjBpNDd2Nmp4a2N3MDA"}',
    "Bearer authentication is required for this endpoint",
    # key material that is public, hashes, ids
    '{"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"}',
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n-----END CERTIFICATE-----",
    "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQENBFxyzAbCdEfGh\n-----END PGP PUBLIC KEY BLOCK-----",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    'etag "33a64df551425fcc55e4d42a148795d9f25f89d4"',
    "SHA1 da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "UUID 550e8400-e29b-41d4-a716-446655440000",
    "The Base64 of 'hello' is aGVsbG8=",
    "pip install scikit-learn; the sk-learn alias is gone",
    'API_KEY = "alk_acme_..."  # the README\'s example',
    # numbers that are not phones, cards or IBANs
    "order 0049301234567 shipped",
    "batch 00123 of 00456",
    "error code 0x0044 at offset 00451",
    "ISBN 0-306-40615-2",
    "ISBN-13: 978-0-306-40615-7",
    "flight LH 0044 departs 10:05",
    "invoice 2024-0049-3090-1820",
    "PO 00441234 received",
    "timestamp 1710505845123",
    "4111 1111 1111 1112 fails the check",
    "test card ending in 4242",
    "DE00 3704 0044 0532 0130 00",
    "de89 is the prefix of a German IBAN",
    "ab12 cd34 ef56 gh78",
    "GB00 TEST 0000 0000 0000 00",
    "codec h264 and mp3 files",
    # addresses that identify no one
    "localhost:8000 and 127.0.0.1:9000",
    "bind 0.0.0.0 port 80",
    "OID 1.3.6.1.4.1.311",
    "semver 1.22.333",
    "IP 999.1.1.1 is invalid",
    "time 12:34:56:78",
    "C++ std::vector::push_back",
    # handles and addresses that are not e-mail
    "@alice_martin on Twitter",
    "user@localhost",
    "decorator @app.route('/')",
    "npm i @types/node@20.11.5",
    "docker pull python:3.11@sha256:abc123",
    # user patterns near misses
    "EMP-12345 is too short",
    "TEMP-004211 sensor offline",
    "CUS-123 is not a customer id",
    # ordinary agent traffic
    "Meeting at 10:30 in room 4.12",
    "score 98.6% on the eval",
    "model Qwen2.5-7B-Instruct, lora rank 16, alpha 32, lr 2e-4",
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(custom={"employee": r"\bEMP-\d{6}\b", "customer": r"\bCUS-\d{8}\b"})


def test_corpus_sizes():
    assert len(POSITIVES) >= 150 and len(NEGATIVES) >= 100
    assert {rule for _, rule, _ in POSITIVES} == {"email", "phone", "card", "iban", "ip", "secret", "custom:employee",
                                                  "custom:customer"}


def test_recall_on_positives(redactor):
    missed = []
    for text, rule, secret in POSITIVES:
        result = redactor.redact(text)
        if secret in result.text or result.counts[rule] < 1:
            missed.append((text, rule, result.text, dict(result.counts)))
    recall = 1 - len(missed) / len(POSITIVES)
    print(f"PII recall {recall:.3f} on {len(POSITIVES)} positives; missed: {missed}")
    assert recall >= 0.98, missed


def test_no_redaction_of_close_negatives(redactor):
    touched = [(text, r.text, dict(r.counts)) for text in NEGATIVES if (r := redactor.redact(text)).counts]
    assert touched == []


def test_subjects_are_normalized_identifiers(redactor):
    a = redactor.redact("call +1 415-555-2671 or mail Alice@Example.com")
    b = redactor.redact("my phone is (415) 555-2671; alice@example.com")
    assert a.subjects == b.subjects == {"+14155552671", "alice@example.com"}
    assert {subject_key("acme", s, SECRET) for s in a.subjects} == {subject_key("acme", s, SECRET) for s in b.subjects}
    assert redactor.redact("AKIAIOSFODNN7EXAMPLE").subjects == set()  # a key is not a person


def test_international_00_phones_and_any_case_ibans_have_one_normal_form(redactor):
    assert redactor.redact("ring 0044 20 7946 0958").subjects == redactor.redact("ring +44 20 7946 0958").subjects \
        == {"+442079460958"}
    assert redactor.redact("ring 0044 20 7946 0958").text == "ring [PHONE]"  # the 00 goes with the number
    lower, upper = redactor.redact("iban de89 3704 0044 0532 0130 00"), redactor.redact("IBAN DE89370400440532013000")
    assert lower.subjects == upper.subjects == {"DE89370400440532013000"}
    assert lower.counts == {"iban": 1}  # not also a phone: the 0044 inside the IBAN is no exit code


def test_a_named_secret_loses_its_value_and_keeps_its_name(redactor):
    """Only the value goes: the JSON of a tool call stays JSON, an env file stays an env file."""
    import json

    arguments = '{"user": "admin", "password": "Tr0ub4dor&3", "api_key" : "9f8e7d6c5b4a39281706", "retries": 3}'
    redacted = redactor.redact(arguments).text
    assert json.loads(redacted) == {"user": "admin", "password": "[SECRET]", "api_key": "[SECRET]", "retries": 3}
    env_file = "DB_PASSWORD=Sup3rS3cret!\nDB_HOST=db.internal\n"
    assert redactor.redact(env_file).text == "DB_PASSWORD=[SECRET]\nDB_HOST=db.internal\n"
    escaped = '{"env": "DB_PASSWORD=Sup3rS3cret!\\nDEBUG=true"}'  # an env file inside a JSON string
    assert redactor.redact(escaped).text == '{"env": "DB_PASSWORD=[SECRET]\\nDEBUG=true"}'


def test_a_password_in_a_url_is_a_secret_not_an_email_address(redactor):
    """Before URL passwords were secrets, "s3cretpass@db.example.com" passed for an e-mail address: the password
    came out as a person's subject key."""
    result = redactor.redact("postgresql://admin:s3cretpass@db.example.com:5432/prod")
    assert result.text == "postgresql://admin:[SECRET]@db.example.com:5432/prod"
    assert result.counts == {"secret": 1} and result.subjects == set()


def test_redact_record_walks_messages_tool_calls_and_maps(redactor):
    record = {"request_messages": [{"role": "user", "content": "I am bob@example.com"}],
              "response": "noted, bob@example.com", "tool_calls": [{"id": "1", "name": "f", "arguments": '{"ip": "10.1.2.3"}'}],
              "attributes": {"client": "203.0.113.9"}, "tools_json": None}
    found = redact_record(record, redactor, ("request_messages", "response", "tool_calls", "tools_json", "attributes"))
    assert "bob@" not in str(record) and "10.1.2.3" not in str(record) and "203.0.113.9" not in str(record)
    assert found.counts == {"email": 2, "ip": 2}
    assert found.subjects == {"bob@example.com", "10.1.2.3", "203.0.113.9"}


def test_bad_user_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="not a regex"):
        Redactor(custom={"broken": "("})


def test_no_valid_phone_number_is_shorter_than_the_digit_prefilter():
    """The matcher is skipped below MIN_PHONE_DIGITS digits: no region's numbers may be shorter."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    from adaptloop.streams.pii_detectors import MIN_PHONE_DIGITS

    shortest = min(length for region in phonenumbers.SUPPORTED_REGIONS
                   for length in PhoneMetadata.metadata_for_region(region).general_desc.possible_length if length > 0)
    assert shortest >= MIN_PHONE_DIGITS


def test_a_cached_redaction_is_the_same_and_still_counted_per_call(redactor):
    text = "You are a helpful agent. Escalations: ops@example.com, +44 20 7946 0958."
    first, second = redactor.redact(text), redactor.redact(text)
    assert first.text == second.text == "You are a helpful agent. Escalations: [EMAIL], [PHONE]."
    assert first.counts == second.counts == {"email": 1, "phone": 1}
    assert first.subjects == second.subjects == {"ops@example.com", "+442079460958"}
    total = Redaction("")
    redactor.redact(text, total)
    redactor.redact(text, total)
    assert total.counts == {"email": 2, "phone": 2}


# One text per secret shape (the corpus above misses some), and what IGNORECASE matches beyond ASCII:
# each secret pattern runs only on texts holding one of its words, so every shape must still be found.
EVERY_SECRET_SHAPE = [
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    "ASIAY34FZKBOKMUTVV7A", "gho_16C7e42F292c6912E7710c838347Ae178B4a", "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789",
    "xoxp-2048-4096-8192-abcdef", "pk_test_TYooMQauvdEDq54NiTphI7jx", "rk_live_51H8abcdefghijklmnop",
    "sk-ant-api03-abcdefghijklmnopqrstuvwx", "sk-abcdefghijklmnopqrstuvwx1234",
    "BEARER abcdefghijklmnop1234", "secret_key=abcdefgh12345678", "ACCESS-TOKEN: 'abcdefgh12345678'",
    "auth_token = abcdefgh12345678", "passwd: correcthorse9", "Secret: hunter2hunter2",
    "paſſword=abcdefgh12345678", "apı_key=abcdefgh12345678",  # a long s and a dotless i, as IGNORECASE reads them
    "PAſſWORD: 'x1'", "apı key is 9f8e7d6c5b4a",
    '{"password": "Tr0ub4dor&3"}', '\\"client_secret\\": \\"Zx8Kq2LmN4pR7sT1\\"', "DB_PASSWORD=pg", "MYSQL_PWD=r00t",
    "<password>Xml-P4ss!</password>", "--db-password 'Tr1cky#Pass'", "--api-key 0a1b2c3d4e5f6a7b8c9d",
    "?access_token=EAAGm0PX4ZCpsBA1b2c3d4&x=1", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;",
    "&sig=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D", "abc8Q~Zx7yW6vU5tS4rQ3pO2nM1lK0jI9hG8fE7d",
    "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", "ya29.a0AfH6SMBx3dExampleTokenValue99",
    "glpat-xYz123AbC456dEf789gH", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "Authorization: Basic YWxhZGRpbjpvcGVu",
    "alk_1a2b3c4d_Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u", "ansible_ssh_pass=Vagrant1",
    "redis://:pw@localhost:6379", "postgres://admin:p@ss@10.0.0.5/db", "curl -s -u admin:S3cr3t! https://example.com",
    '"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvgIBADANBgkqhkiG9w0BAQEFAASC\\nAmDx3Kq9',
]


def test_every_key_name_holds_one_of_its_prefilter_words():
    from adaptloop.streams.pii_detectors import _KEY_KINDS, _KEY_WORDS

    names = ["secret", "token"] + [f"{kind}{joint}key" for kind, joints in _KEY_KINDS.items() for joint in joints]
    assert [name for name in names if not any(word in name for word in _KEY_WORDS)] == []


@pytest.mark.parametrize("text", EVERY_SECRET_SHAPE)
def test_every_secret_shape_is_found_past_the_word_prefilter(redactor, text):
    from adaptloop.streams.pii_detectors import _KEY_BEGIN, _SECRET_RES

    assert any(pattern.search(text) for _, pattern in _SECRET_RES) or _KEY_BEGIN.search(text), "not a secret shape"
    assert redactor.redact(text).counts.get("secret") == 1, text


@pytest.mark.parametrize("shape", [
    "a%", "-----BEGIN RSA PRIVATE KEY-----\n", "x@a.", "password=", "AKIAIOSFODNN7EXAMPLE ",
    # the named secrets: every separator, quoting, a value that never starts or ends, prose that is no value
    '"password": "', '\\"password\\": \\"', "DB_PASSWORD=", "password is ", "password:", "token: a",
    "client_secret=a1&", "token=", "api_key\\", "AccountKey=", "--db-password ", "--", "<password>a", "api key: ",
    "page_token=a1", "password=*", "x-api-key:a1", "private_key",
    "AKIAIOSFODNN7EXAMPLE,", "&sig=", "a1Q~", "Authorization: Basic ", "curl -u ", "curl ",
    "-----BEGIN PRIVATE KEY-----\\n", "A\\n",
    # URL passwords: schemes without credentials, credentials without a host
    "://a:", "://:p@", "x://", "a:b@",
    # phones after a 00 exit code, IBANs in lower case
    "0044 ", "00", "de89 ",
])
def test_redaction_time_grows_linearly_on_adversarial_runs(redactor, shape):
    """200 KB of the shape costs about what 200 KB of ordinary agent traffic costs, measured side by side, never
    20 times more: a regex that rescans the rest of the text from each position, or a splice per match, is
    quadratic (100 KB of "a%...@" took 7.8 s, 112 KB of repeated BEGIN lines 6 s, against ~0.1 s of ordinary
    text). Not a speed target (that is ``adaptloop.streams.bench.redaction``): a guard against the quadratic
    shapes, with a margin no scheduler noise reaches."""
    import time

    from adaptloop.streams.bench.redaction import ORDINARY

    def seconds(text: str) -> float:
        started = time.perf_counter()
        redactor.redact(text)
        return time.perf_counter() - started

    size = 200_000
    ordinary = (ORDINARY * (size // len(ORDINARY) + 1))[:size]
    adversarial = shape * (size // len(shape)) + "@"
    baseline, took = min(seconds(ordinary) for _ in range(2)), min(seconds(adversarial) for _ in range(2))
    assert took < 20 * baseline, (shape, baseline, took)


def test_a_truncated_key_block_is_redacted_to_where_its_lines_stop(redactor):
    text = "see -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIAbc\nxyz+/=\nThanks for looking, Bob."
    assert redactor.redact(text).text == "see [SECRET]Thanks for looking, Bob."
    escaped = '{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvgIBADANBgkq\\nAmDx3Kq9", "client_email": "x"}'
    assert redactor.redact(escaped).text == '{"private_key": "[SECRET]", "client_email": "x"}'  # a service account's JSON
    public = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----"
    assert redactor.redact(public).text == public

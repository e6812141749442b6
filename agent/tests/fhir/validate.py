"""Validates FHIR R4 JSON documents with the fhir.resources 6.4.0 models (FHIR 4.0.1).

Usage: validate.py FILE...   Each FILE holds one resource. Prints one line per file; exits 1
if any fails. Nested resources (Bundle entries) are validated by their own models. Unknown
elements, missing required elements, wrong types and malformed primitives all fail.
"""

import json
import sys

from fhir.resources import construct_fhir_element


def main(paths):
    failed = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        kind = doc.get("resourceType", "?")
        try:
            construct_fhir_element(kind, doc)
        except Exception as e:  # every validation failure is reported, not raised
            failed += 1
            print(f"INVALID {path} ({kind}): {e}")
        else:
            print(f"valid {path} ({kind})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

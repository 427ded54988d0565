#!/usr/bin/env python3
"""POST /payments written the mainstream way, as a yardstick for rinha.py's hot path.

A Starlette app on uvicorn (one worker, no access log): parse the JSON body, validate it with
the same rules as rinha.py (a JSON object; correlationId a UUID string; amount a number over
0.00 and at most 1,000,000,000, rounded half to even to cents), append it to an in-memory list
and answer 202. bench/bench.py runs it next to rinha.py under the same wrk load.

    python bench/micro_app.py --port 18080 [--host 127.0.0.1]
"""
import argparse
import json
import re
from decimal import ROUND_HALF_EVEN, Decimal

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MAX_AMOUNT = Decimal("1000000000")
CENT = Decimal("0.01")

payments = []


def bad_request(message):
    return JSONResponse({"error": message}, status_code=400)


async def create_payment(request):
    try:
        payment = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return bad_request("body is not valid JSON")
    if not isinstance(payment, dict):
        return bad_request("body must be a JSON object")
    cid = payment.get("correlationId")
    if not isinstance(cid, str) or len(cid) != 36 or not UUID_PATTERN.fullmatch(cid):
        return bad_request("correlationId must be a UUID string")
    amount = payment.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount != amount \
            or amount in (float("inf"), float("-inf")):
        return bad_request("amount must be a number")
    cents = int(Decimal(repr(amount)).quantize(CENT, ROUND_HALF_EVEN) * 100)
    if cents <= 0 or cents > MAX_AMOUNT * 100:
        return bad_request("amount must be over 0.00 and at most 1000000000")
    payments.append((cid, cents))
    return Response(status_code=202)


async def health(request):
    return JSONResponse({"payments": len(payments)})


app = Starlette(routes=[
    Route("/payments", create_payment, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
])


def main():
    parser = argparse.ArgumentParser(description="mainstream POST /payments (Starlette + uvicorn)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()

"""What a block's size costs on the MongoDB server `make up` runs.

One targeted `$set` of one seat in a block of 100, 250 and 1,000 seats
(200 updates each, conditional on and incrementing `w`, as the projector
writes), and one ordered `bulkWrite` creating a 100,000-seat show's blocks
and tallies at each size. Prints medians; needs pymongo (installed with
SecantusDB by `scripts/infra.sh up`).

    python3 bench/probes/block_size.py [mongodb://127.0.0.1:27017]
"""
import statistics
import sys
import time

import pymongo
from pymongo import ReplaceOne

client = pymongo.MongoClient(sys.argv[1] if len(sys.argv) > 1 else "mongodb://127.0.0.1:27017")
db = client["block_size_probe"]
try:
    for n in (100, 250, 1000):
        col = db[f"b{n}"]
        col.drop()
        col.insert_one({"_id": "x", "seats": {f"A{i}": {"s": "available", "q": 0} for i in range(n)}, "w": 0})
        times = []
        for i in range(200):
            t = time.perf_counter()
            col.update_one({"_id": "x", "w": i},
                           {"$set": {f"seats.A{i % n}": {"s": "booked", "q": i + 1}}, "$inc": {"w": 1}})
            times.append((time.perf_counter() - t) * 1000)
        print(f"block of {n} seats: one seat's update p50 {statistics.median(times):.2f} ms")
    for n in (1000, 250):
        ops = []
        for k in range(100_000 // n):
            ops.append(ReplaceOne({"_id": f"s:{k}", "touched": {"$ne": True}},
                                  {"_id": f"s:{k}", "seats": {f"A{i}": {"s": "available", "q": 0} for i in range(n)}, "w": 0},
                                  upsert=True, namespace=f"block_size_probe.c{n}"))
            ops.append(ReplaceOne({"_id": f"s:{k}", "w": {"$lte": 0}},
                                  {"_id": f"s:{k}", "counts": {"total": n, "available": n, "held": 0, "booked": 0}, "w": 0},
                                  upsert=True, namespace=f"block_size_probe.t{n}"))
        t = time.perf_counter()
        client.bulk_write(ops, ordered=True)
        print(f"100,000 seats in blocks of {n}: {len(ops)} upserts in one bulkWrite {1000 * (time.perf_counter() - t):.0f} ms")
finally:
    client.drop_database("block_size_probe")

"""Example 3: fallbacks for a function whose upstream goes down.

`Fallback.chain` tries the last good result for the same arguments (cached for 60 s),
then a backup function, then a default value. Statistics say which one answered.
Run: python docs/examples/fallback_chain.py
"""

from corral import Fallback

upstream_up = True


def backup_rate(currency: str) -> float:
    if currency != "EUR":
        raise LookupError(f"the backup has no rate for {currency}")
    return 1.08


cache = Fallback.cached(ttl=60.0)
rates = Fallback.chain(cache, Fallback.call(backup_rate), Fallback.default(None))


@rates
def exchange_rate(currency: str) -> float | None:
    if not upstream_up:
        raise TimeoutError("rates service did not answer in time")
    return {"EUR": 1.09, "GBP": 1.27, "JPY": 0.0067}[currency]


def main() -> None:
    global upstream_up
    print("GBP live:", exchange_rate("GBP"))
    upstream_up = False
    print("GBP while down (cached):", exchange_rate("GBP"))
    print("EUR while down (backup):", exchange_rate("EUR"))
    print("JPY while down (default):", exchange_rate("JPY"))
    stats = cache.statistics()
    print(f"cache: {stats.hits} hit, {stats.misses} misses; chain served "
          f"{rates.statistics().served}")
    assert (stats.hits, stats.misses, rates.statistics().served) == (1, 2, 3)
    print("ok")


if __name__ == "__main__":
    main()

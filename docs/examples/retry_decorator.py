"""Example 1: retry a synchronous function with a decorator.

`fetch_quote` fails twice with a connection reset, as a flaky upstream does; the
decorator retries it on the exponential schedule (100, 200 ms ± 25 %) and counts what
it did. Run: python docs/examples/retry_decorator.py
"""

from corral import retry

calls = 0


@retry(max_attempts=4, strategy="exponential", initial_delay_ms=100,
       retryable_errors=["Timeout", "TransportError"],
       on_retry=lambda attempt, delay, error: print(
           f"attempt {attempt} failed with {error!r}; retrying in {delay * 1000:.0f} ms"))
def fetch_quote(symbol: str) -> str:
    global calls
    calls += 1
    if calls < 3:
        raise ConnectionResetError("upstream reset the connection")
    return f"{symbol}: 101.5"


def main() -> None:
    print(fetch_quote("ACME"))
    assert calls == 3
    # A client-side bug is never retried: a ValueError is UnknownError, not retryable.
    @retry(max_attempts=5)
    def broken() -> None:
        raise ValueError("bad symbol")

    try:
        broken()
    except ValueError as exc:
        print(f"not retried: {exc!r}")
    print("ok")


if __name__ == "__main__":
    main()

"""The local object store under concurrent writers (two uploads of the same dataset write the same keys)."""

import threading

from sculptor.storage import ObjectStore


def test_concurrent_writes_of_one_key_all_succeed(tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(25):
                store.put_bytes("datasets/same/eval.jsonl", f"writer {i}\n".encode())
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert store.get_bytes("datasets/same/eval.jsonl").decode().startswith("writer ")
    assert [p.name for p in (tmp_path / "datasets" / "same").iterdir()] == ["eval.jsonl"]  # no temporaries left

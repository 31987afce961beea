"""A daisy block worker on a cluster node: ``python -m jaxseg.decoding.worker SPEC``.

Started by ``config.decode.worker_command`` (e.g. ``srun -N1 -n1 -c4``) with daisy's context in
the environment. ``SPEC`` is the pickled ``(BlockJob, block function)`` the scheduler wrote to the
scratch folder; the worker connects back to the scheduler and processes blocks until none remain.
"""

from __future__ import annotations

import pickle
import sys


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: python -m jaxseg.decoding.worker SPEC")
  import daisy

  with open(argv[1], "rb") as f:
    job, function = pickle.load(f)
  client = daisy.Client()
  while True:
    with client.acquire_block() as block:
      if block is None:
        return
      function(job, block)


if __name__ == "__main__":
  main(sys.argv)

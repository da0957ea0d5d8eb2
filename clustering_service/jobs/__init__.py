"""Training and update jobs: procrastinate carries them (:mod:`.queue`), a
worker runs them (:mod:`.worker`, :mod:`.runner`), and :mod:`.train` does the
work of one job on the pure algorithms."""

"""Pure saga logic: definitions, instances and the `decide` function. No I/O."""

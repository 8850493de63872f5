"""Planning: liveness → schedule → Plan. Pure functions over plain data."""

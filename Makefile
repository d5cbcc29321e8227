# The two commands of the README. Both set up first (scripts/setup.sh: environment, C++ extension), then run.
.PHONY: setup test bench clean

setup:
	@bash scripts/setup.sh > /dev/null

test:
	@py=$$(bash scripts/setup.sh) && "$$py" -m pytest -q $(PYTEST_ARGS)

bench:
	@py=$$(bash scripts/setup.sh) && "$$py" -m ghostfused bench $(BENCH_ARGS)

clean:
	rm -rf build ghostfused/_C*.so *.egg-info

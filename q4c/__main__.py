"""`python -m q4c ...` runs the q4c command line."""

from q4c.cli import main

if __name__ == "__main__":
    main()

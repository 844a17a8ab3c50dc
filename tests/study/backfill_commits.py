"""Fill the study CSV's empty `commit` cells, those of the parts written before tests/study/sweep.py recorded the
commit of the code that ran them: each such part's rows get the short hash of the commit that first added that
part's rows to .assets/study_runs.csv. Adds the column where the CSV lacks it, leaves filled cells as they are, and
rewrites the CSV atomically (a temporary file beside it, then renamed over it).

    python tests/study/backfill_commits.py                   # .assets/study_runs.csv
    python tests/study/backfill_commits.py FILE.csv          # another copy of it, by the same history
"""
import argparse
import csv
import io
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/study/ -> the repository
STUDY_CSV = os.path.join(ROOT, '.assets', 'study_runs.csv')
HISTORY = '.assets/study_runs.csv'  # the path whose history says which commit first added a part's rows


def first_commits(root=ROOT, path=HISTORY):
    """{part: the short hash of the first commit whose copy of path holds rows of it}."""
    git = lambda *a: subprocess.run(['git', *a], cwd=root, capture_output=True, text=True).stdout
    first = {}
    for commit in git('log', '--format=%h', '--reverse', '--', path).split():
        for row in csv.DictReader(io.StringIO(git('show', f'{commit}:{path}'))):
            first.setdefault(row['part'], commit)
    return first


def backfill(path, first):
    """Fill path's empty commit cells from first ({part: commit}). Returns {part: (rows filled, commit)} and the
    parts whose empty cells no commit fills."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames), list(reader)
    if 'commit' not in columns:
        columns.append('commit')
    filled, unknown = {}, set()
    for row in rows:
        if row.get('commit'):
            continue
        row['commit'] = first.get(row['part'], '')
        if row['commit']:
            filled[row['part']] = (filled.get(row['part'], (0, ''))[0] + 1, row['commit'])
        else:
            unknown.add(row['part'])
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, columns)  # the csv module's line ends, as sweep.py writes them
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return filled, sorted(unknown)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('csv', nargs='?', default=STUDY_CSV)
    args = parser.parse_args()
    filled, unknown = backfill(args.csv, first_commits())
    for part, (n, commit) in filled.items():
        print(f'{part}: {n} rows <- {commit}')
    if unknown:
        print(f'no commit added the rows of {", ".join(unknown)} yet: their commit cells stay empty')

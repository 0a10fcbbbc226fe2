"""Screenshots of the built site in headless Chromium (Debian's ``chromium`` package), to look at what a reader sees.

  make docs && python docs/screenshots.py --out /tmp/mtlmatch_docs_shots     # PNGs; nothing is written in the repo

Pages: the home page, one API page (``mtlmatch.losses``), one tutorial (the compose-losses notebook) and the maths.
The pages are opened from the files (``file://``) with the network off, so what renders (MathJax included) is what
the site serves by itself.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PAGES = {
    'home': 'index.html',
    'api_losses': 'api/losses.html',
    'tutorial_compose_losses': '_generated/tutorials/compose_losses.html',
    'maths': 'maths.html',
}
FLAGS = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--hide-scrollbars',
    '--proxy-server=127.0.0.1:9',  # no network: a page that needed one would show it
    '--virtual-time-budget=8000',  # let MathJax typeset before the shot
]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--site', default=os.path.join(HERE, '_build', 'html'), help='the built site')
  parser.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'mtlmatch_docs_shots'))
  parser.add_argument('--size', default='1280,1800', help='window width,height in pixels')
  parser.add_argument('--browser', default=shutil.which('chromium') or 'chromium')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for name, page in PAGES.items():
    path = os.path.join(os.path.abspath(args.site), page)
    if not os.path.exists(path):
      print(f'{path}: no such page (build the site first: make docs)', file=sys.stderr)
      return 1
    shot = os.path.join(args.out, f'{name}.png')
    with tempfile.TemporaryDirectory() as profile:
      subprocess.run(
          [args.browser, *FLAGS, f'--user-data-dir={profile}', f'--window-size={args.size}', f'--screenshot={shot}']
          + [f'file://{path}'],
          check=True,
          capture_output=True,
          timeout=120,
      )
    print(shot)
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Checks every internal link of the built site: each href and src to a page or file of the site must exist, and
each ``#anchor`` must be an ``id`` on the page it points to. No network (links to other sites are not followed).

  python docs/check_links.py docs/_build/html     # exit 1 and one line per broken link
"""

import html.parser
import os
import sys
import urllib.parse


class _Page(html.parser.HTMLParser):
  """The ids a page defines and the (attribute, value) links it holds."""

  def __init__(self):
    super().__init__()
    self.ids, self.links = set(), []

  def handle_starttag(self, tag, attrs):
    for name, value in attrs:
      if name in ('id', 'name') and value:
        self.ids.add(value)
      if name in ('href', 'src') and value:
        self.links.append(value)


def _parse(path: str) -> _Page:
  page = _Page()
  with open(path, encoding='utf-8') as f:
    page.feed(f.read())
  return page


def broken_links(root: str) -> list[str]:
  """One line ``page: link (why)`` per broken internal link of the HTML files under ``root``."""
  root = os.path.abspath(root)
  pages = {}
  for folder, _, files in os.walk(root):
    if os.path.relpath(folder, root).split(os.sep)[0] == '_static':
      continue  # the theme's assets (its template macros are not pages)
    for name in files:
      if name.endswith('.html'):
        pages[os.path.join(folder, name)] = _parse(os.path.join(folder, name))
  if not pages:
    return [f'{root}: no HTML pages (build the site first: make docs)']
  problems = []
  for path, page in sorted(pages.items()):
    for link in page.links:
      url = urllib.parse.urlsplit(link)
      if url.scheme or url.netloc or link.startswith(('mailto:', 'javascript:', 'data:')):
        continue  # another site (or not a location): not followed
      target = (
          os.path.normpath(os.path.join(os.path.dirname(path), urllib.parse.unquote(url.path))) if url.path else path
      )
      if os.path.isdir(target):
        target = os.path.join(target, 'index.html')
      where = f'{os.path.relpath(path, root)}: {link}'
      if not target.startswith(root + os.sep) and target != root:
        problems.append(f'{where} (points outside the site)')
      elif not os.path.exists(target):
        problems.append(f'{where} (no such file)')
      elif url.fragment and target.endswith('.html'):
        ids = pages[target].ids if target in pages else _parse(target).ids
        if urllib.parse.unquote(url.fragment) not in ids:
          problems.append(f'{where} (no id {url.fragment!r} on {os.path.relpath(target, root)})')
  return problems


def main(argv: list[str]) -> int:
  root = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), '_build', 'html')
  problems = broken_links(root)
  for line in problems:
    print(line)
  print(f'check_links: {root}: {len(problems)} broken internal links', file=sys.stderr)
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))

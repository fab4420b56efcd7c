// List calls return pages; the CLI walks them all unless --limit says stop.
const MAX_PAGE = 1000;

export interface Page<T> {
  items: T[];
  next: string;
}

/**
 * Fetches pages until the server says done or `limit` items are in hand.
 * The last page is asked for at exactly the size still wanted, so the
 * returned `next` token resumes right after the last item returned.
 */
export async function collect<T>(limit: number | undefined, fetch: (pageSize: number, pageToken: string) => Promise<Page<T>>): Promise<Page<T>> {
  const items: T[] = [];
  let token = "";
  for (;;) {
    const want = limit === undefined ? MAX_PAGE : Math.min(MAX_PAGE, limit - items.length);
    const page = await fetch(want, token);
    items.push(...page.items);
    token = page.next;
    if (token === "" || (limit !== undefined && items.length >= limit)) return { items, next: token };
  }
}

/**
 * collect() for a list filtered by a label selector on this side: every page
 * is fetched, the items that match are kept, and --limit counts those. No
 * page token is handed back then (the filtered list has none to resume at).
 */
export async function collectSelected<T>(
  limit: number | undefined,
  select: ((item: T) => boolean) | undefined,
  fetch: (pageSize: number, pageToken: string) => Promise<Page<T>>,
): Promise<Page<T>> {
  if (!select) return collect(limit, fetch);
  const all = await collect(undefined, fetch);
  const items = all.items.filter(select);
  return { items: limit === undefined ? items : items.slice(0, limit), next: "" };
}

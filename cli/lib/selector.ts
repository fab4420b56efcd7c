// Label selectors for lists, kubectl's equality-based form:
//   -l env=prod            the label env is prod (also env==prod)
//   -l env!=prod           env is not prod, or there is no env label
//   -l env                 there is an env label
//   -l '!env'              there is none
//   -l env=prod,tier=web   every term (comma = AND)
// No List RPC takes a selector today, so the CLI filters what the server
// lists (collectSelected in paging.ts walks every page first).
import { InvalidArgumentError, Option } from "commander";

export type Term = { key: string; op: "=" | "!="; value: string } | { key: string; op: "exists" | "!exists" };

const KEY = /^[A-Za-z0-9_.-]{1,63}$/;

export function parseSelector(text: string): Term[] {
  const terms: Term[] = [];
  for (const raw of text.split(",")) {
    const t = raw.trim();
    if (t === "") throw new InvalidArgumentError(`empty term in label selector ${JSON.stringify(text)}`);
    const m = /^([^=!]+)(==|=|!=)(.*)$/.exec(t);
    let term: Term;
    if (m) term = { key: m[1].trim(), op: m[2] === "!=" ? "!=" : "=", value: m[3].trim() };
    else if (t.startsWith("!")) term = { key: t.slice(1).trim(), op: "!exists" };
    else term = { key: t, op: "exists" };
    if (!KEY.test(term.key)) {
      throw new InvalidArgumentError(
        `label selector term ${JSON.stringify(t)}: ${JSON.stringify(term.key)} is not a label key (1–63 of [A-Za-z0-9_.-]); forms: key=value, key!=value, key, !key`,
      );
    }
    // eslint-disable-next-line no-control-regex -- control characters are what it refuses
    if ("value" in term && /[\x00-\x1f\x7f,]/.test(term.value)) throw new InvalidArgumentError(`label selector term ${JSON.stringify(t)}: bad value`);
    terms.push(term);
  }
  return terms;
}

export function matches(terms: Term[], labels: { key: string; value: string }[]): boolean {
  return terms.every((t) => {
    const l = labels.find((x) => x.key === t.key);
    switch (t.op) {
      case "=":
        return l !== undefined && l.value === t.value;
      case "!=":
        return l === undefined || l.value !== t.value;
      case "exists":
        return l !== undefined;
      case "!exists":
        return l === undefined;
    }
  });
}

/** -l, --selector; repeated -l add terms (AND), like commas. */
export const selectorOption = () =>
  new Option("-l, --selector <selector>", "only items whose labels match: key=value, key!=value, key, !key; comma = AND (filtered by the CLI)").argParser(
    (v: string, prev: Term[] | undefined) => [...(prev ?? []), ...parseSelector(v)],
  );

/** The filter for -l's terms, or undefined without -l. */
export function selectorFilter<T extends { labels: { key: string; value: string }[] }>(terms: Term[] | undefined): ((item: T) => boolean) | undefined {
  return terms && terms.length > 0 ? (item) => matches(terms, item.labels) : undefined;
}

// Help text shared by microvpc and microvpcd: each option's default is shown
// once. Commander appends "(default: X)" to every option that has a default
// value; where the description already says what the default is ("default:
// the lowest free one"), or the default is only an empty placeholder ("" or
// []), that second mention is dropped.
import type { Help, HelpConfiguration, Option } from "commander";

function placeholder(v: unknown): boolean {
  return v === "" || (Array.isArray(v) && v.length === 0);
}

export const helpConfig: HelpConfiguration = {
  optionDescription(this: Help, option: Option): string {
    const base = Object.getPrototypeOf(this) as Help;
    const own = option.description ?? "";
    if (option.defaultValue === undefined || !(placeholder(option.defaultValue) || /\bdefault\b/i.test(own))) {
      return base.optionDescription.call(this, option);
    }
    // The same option without its default value, for commander to describe.
    const shown = Object.assign(Object.create(Object.getPrototypeOf(option) as object) as Option, option, { defaultValue: undefined });
    return base.optionDescription.call(this, shown);
  },
};

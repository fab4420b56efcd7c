// Types of build.mjs for the TypeScript that imports it (test/lib/global-setup.ts).
export declare const DIST: string;
export declare function build(options?: { quiet?: boolean; outdir?: string; commit?: string }): Promise<void>;
